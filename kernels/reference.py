"""Pure-torch delta ops: the CPU serving path and the oracle of every kernel test (D5).

Same signatures and semantics as the Triton launchers; intermediates stay in fp32 like the kernels
(vLLM ``punica_cpu.py`` keeps an fp32 shrink buffer for the same reason). No argument checks here:
the public ops in ``kernels/__init__.py`` check before dispatching.

Five execution plans, chosen per call from the step metadata. Numbers: ratio of the delta to the
base matmul, q_proj 1024x1024, r=16, fp32, 1 thread, CPU time (``benchmarks/bench_kernels.py``;
``../shared/BASELINES-CPU.md`` §3 has the 2-thread idle-machine baselines):

* runs: each maximal run of tokens sharing a slot is a contiguous row range, so two matmuls on
  views add into ``y`` with no gather or scatter (prefill, one run per sequence: ~0.1x at T=2048).
  Chosen first whenever runs average RUN_MIN_TOKENS tokens: one big group costs grouped_mm 0.19 ms
  against 0.05 ms for the plain mm (T=64, one slot).
* grouped (``reference_grouped.py``): tokens sorted by slot against the whole pool with
  ``F.grouped_mm``, one shrink/expand pair per distinct active rank, nothing gathered. The default
  otherwise, where grouped_mm runs (CPU, fp32): decode T=32 on 32 slots ~0.5x (q_proj) and the seven
  Llama projections together ~0.29x of their base matmuls with B pools stored [S, R, out], vs ~0.42x
  for the gathered plan.
* padded: each active slot's tokens padded to the longest segment; A/B gathered once per slot and
  two batched matmuls (64 tokens on 8 or 32 slots: ~0.2x / ~0.65x, vs ~0.25x / ~1.0x for a loop).
* segments: tokens gathered grouped by slot, one matmul pair per slot, scattered back (many tokens
  per slot, interleaved, uneven).
* gather: each token's A/B rows gathered into reused buffers, two batched matmuls; with mixed ranks,
  one gather per rank group so a rank-4 token does not pay rank 64 (D3). Decode (T=32, 32 slots)
  costs ~0.6-0.8x on one projection vs ~1.4x for the loop; with B pools stored [S, R, out] the
  seven Llama projections together cost ~0.43x of their base matmuls.
Only up to the largest *active* rank is read, and ranks beyond a slot's own are masked (gathered
plans) or never read (grouped, runs, segments).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from . import reference_grouped
from ._triton import next_pow2
from .meta import DeltaKernelMeta
from .reference_common import ACT_FNS as _ACT_FNS
from .reference_common import WS as _WS
from .reference_common import add_rows as _add_rows
from .reference_common import apply_act, f32 as _f32
from .reference_common import one_thread

RUN_MIN_TOKENS = 4
"""Average run (or segment) length from which per-run matmuls beat the gathered bmm: one run costs
~15 us of launches on 2 cores, one gathered token ~5 us at in=out=1024, r=16."""

PAD_MAX_WASTE = 2
"""padded plan: used while padding every slot's segment to the longest at most doubles the rows."""

ROWS_MAX_RUNS = 8
"""add_bias / mul_rows: up to this many runs, slice per run; beyond, one gather does it."""

PLANS = ("runs", "segments", "padded", "gather", "grouped")
_forced: list[str] = []

GROUPED_CPU_FP32 = reference_grouped.supported(torch.empty(0))
"""Whether ``F.grouped_mm`` runs here on CPU fp32 (probed once at import): the default of ``_plan``."""


@contextmanager
def force_plan(plan: str):
    """Use ``plan`` for every call inside the block (tests cover each plan on the same inputs; the
    benchmark times them against each other to set RUN_MIN_TOKENS). "padded" and "grouped" fall back to
    "gather" where they cannot run (several rank groups; no grouped_mm for the device or dtype)."""
    if plan not in PLANS:
        raise ValueError(f"force_plan: {plan!r} is not one of {', '.join(PLANS)}")
    _forced.append(plan)
    try:
        yield
    finally:
        _forced.pop()


def _plan(meta: DeltaKernelMeta, *, padded_ok: bool = False, grouped_ok: bool | None = None,
          dtype: torch.dtype = torch.float32) -> str:
    """The plan for this call. ``grouped_ok``: whether the grouped plan can run on the call's tensors
    (``reference_grouped.lora_ok``; None: whether it runs on CPU fp32); it is picked unforced only for
    ``reference_grouped.PREFERRED_DTYPES``."""
    if grouped_ok is None:
        grouped_ok = GROUPED_CPU_FP32
    if _forced:
        forced = _forced[-1]
        if (forced == "padded" and not padded_ok) or (forced == "grouped" and not grouped_ok):
            return "gather"
        return forced
    n = meta.num_active_tokens
    if len(meta.runs_host) * RUN_MIN_TOKENS <= n:
        return "runs"
    if grouped_ok and dtype in reference_grouped.PREFERRED_DTYPES:
        return "grouped"
    if padded_ok and meta.num_active * meta.max_seg_len <= PAD_MAX_WASTE * n:
        return "padded"
    if meta.num_active * RUN_MIN_TOKENS <= n:
        return "segments"
    return "gather"


def _gather_ids(meta: DeltaKernelMeta) -> torch.Tensor | None:
    return None if meta.all_tokens_active else meta.active_token_ids


# ----------------------------------------------------------------------------------------------- LoRA
@one_thread
def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
             rank: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """Semantics: for every token t with s = slot[t] >= 0 and r = rank[s] > 0:
        y[t] += scale[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T
    y [T, out] (in place), x [T, in], lora_a [S, R, in], lora_b [S, out, R], scale fp32 [S], rank int32 [S]."""
    if meta.no_delta:
        return
    ranks = rank.tolist()
    work = [s for s in meta.active_slots_host if ranks[s] > 0]
    if not work:
        return  # no active slot has LoRA at this layer
    _check_limit("add_lora", "rank", ranks, work, lora_a.shape[1])
    one_group = len({max(8, next_pow2(ranks[s])) for s in work}) == 1
    plan = _plan(meta, padded_ok=one_group, grouped_ok=reference_grouped.lora_ok(x, lora_a, lora_b),
                 dtype=y.dtype)
    if plan == "grouped":
        reference_grouped.add_lora(y, x, lora_a, lora_b, scale, ranks, work, meta)
    elif plan == "padded":
        _lora_padded(y, x, lora_a, lora_b, scale, rank, meta, max(ranks[s] for s in work),
                     all(ranks[s] == ranks[work[0]] for s in meta.active_slots_host))
    elif plan == "runs":
        scales = scale.tolist()
        for a, b, s in meta.runs_host:
            if ranks[s]:
                _lora_rows(y[a:b], x[a:b], lora_a[s, :ranks[s]], lora_b[s, :, :ranks[s]], scales[s])
    elif plan == "segments":
        scales = scale.tolist()
        ids = meta.sorted_active_ids  # [N]
        xs = x.index_select(0, ids)  # [N, in]
        ds = _WS.get("seg_d", (ids.numel(), y.shape[1]), torch.float32, y.device)  # [N, out]
        for k, s in enumerate(meta.active_slots_host):
            a, b, r = meta.seg_start_host[k], meta.seg_start_host[k + 1], ranks[s]
            if r == 0:
                ds[a:b].zero_()
                continue
            h = torch.mm(_f32(xs[a:b]), _f32(lora_a[s, :r]).t())  # [n_s, r] fp32
            torch.mm(h, _f32(lora_b[s, :, :r]).t(), out=ds[a:b]).mul_(scales[s])
        _add_rows(y, ids, ds)
    else:
        for size, ids, sl, uniform in _gather_groups(meta, ranks, work):
            _lora_gathered(y, x, lora_a, lora_b, scale, rank, ids, sl, size, uniform)


def _lora_padded(y, x, lora_a, lora_b, scale, rank, meta: DeltaKernelMeta, rmax: int, uniform: bool) -> None:
    """Padded plan: each active slot's tokens padded to the longest segment L, so the weights are gathered
    once per *slot* (not per token) and two batched matmuls [A, L, in] @ [A, in, rmax] @ [A, rmax, out] do
    the rest. Decode (L = 1) is the gathered plan; 64 tokens on 32 slots gather half the bytes."""
    num_act, seg, n = meta.num_active, meta.max_seg_len, meta.num_active_tokens
    ids, pos = meta.sorted_active_ids, meta.padded_positions  # [N] tokens by slot, [N] their padded row
    slots = meta.active_slots.long()  # [A]
    xs = _WS.get("pad_x", (num_act * seg, x.shape[1]), torch.float32, y.device)  # [A*L, in]
    if n < num_act * seg:
        xs.zero_()
    xs.index_copy_(0, pos, _f32(x.index_select(0, ids)))
    h = torch.bmm(xs.view(num_act, seg, -1), _gather(lora_a[:, :rmax], slots, "lora_a").transpose(1, 2),
                  out=_WS.get("pad_h", (num_act, seg, rmax), torch.float32, y.device))  # [A, L, rmax]
    coef = scale.index_select(0, slots).view(num_act, 1, 1)  # [A, 1, 1]
    if not uniform:
        coef = coef * (torch.arange(rmax, device=y.device) < rank.index_select(0, slots).view(num_act, 1, 1))
    h.mul_(coef)
    d = torch.bmm(h, _gather_up(lora_b, rmax, slots, "lora_b"),
                  out=_WS.get("pad_d", (num_act, seg, y.shape[1]), torch.float32, y.device))  # [A, L, out]
    d = d.view(num_act * seg, -1)
    _add_rows(y, ids, d if n == num_act * seg else d.index_select(0, pos))


def _lora_gathered(y, x, lora_a, lora_b, scale, rank, ids, sl, rmax: int, uniform: bool) -> None:
    """Gathered plan on tokens ``ids`` (None = all, in order) whose slots are ``sl`` [n], ranks <= rmax.
    Per token, [1, in] @ [in, rmax] then [1, rmax] @ [rmax, out] as batched matmuls: this orientation
    is ~40x faster in MKL than the matrix-vector one (0.06 vs 2.8 ms at n=32, r=16, in=1024)."""
    n = sl.numel()
    xs = _f32(x if ids is None else x.index_select(0, ids))  # [n, in]
    a_g = _gather(lora_a[:, :rmax], sl, "lora_a")  # [n, rmax, in]
    h = torch.bmm(xs.unsqueeze(1), a_g.transpose(1, 2),
                  out=_WS.get("lora_h", (n, 1, rmax), torch.float32, y.device))  # [n, 1, rmax]
    # The slot's scale on its own ranks, 0 beyond them (padded rows may hold a previous tenant's values);
    # no mask when every slot here has rank rmax (the common case: one rank for all tenants).
    coef = scale.index_select(0, sl).unsqueeze(1)  # [n, 1]
    if not uniform:
        coef = coef * (torch.arange(rmax, device=y.device) < rank.index_select(0, sl).unsqueeze(1))  # [n, rmax]
    h.view(n, rmax).mul_(coef)
    d = torch.bmm(h, _gather_up(lora_b, rmax, sl, "lora_b"),
                  out=_WS.get("lora_d", (n, 1, y.shape[1]), torch.float32, y.device))  # [n, 1, out]
    _add_rows(y, ids, d.view(n, y.shape[1]))


def _gather_groups(meta: DeltaKernelMeta, sizes: list[int], work: list[int]):
    """(size, token ids or None, token slots, all sizes equal) per group of slots whose rank (or width) rounds up to the
    same power of two (>= 8). A gathered batch pays its largest member's rank, so without groups the
    rank-4 tokens of a batch with a rank-64 slot would pay 16x their FLOPs and bytes (D3)."""
    groups: dict[int, list[int]] = {}
    for s in work:
        groups.setdefault(max(8, next_pow2(sizes[s])), []).append(s)
    groups = dict(sorted(groups.items()))
    sl = meta.active_token_slots  # [N]
    if len(groups) == 1:
        # tokens of slots without work here (size 0) stay in the batch, masked by their size
        top = max(sizes[s] for s in work)
        yield top, _gather_ids(meta), sl, all(sizes[s] == top for s in meta.active_slots_host)
        return
    group_of = torch.full((len(sizes),), -1, dtype=torch.int64)  # [S]; -1: no work at this layer
    for g, members in enumerate(groups.values()):
        group_of[members] = g
    tok_group = group_of.to(sl.device).index_select(0, sl)  # [N]
    for g, members in enumerate(groups.values()):
        sub = torch.nonzero(tok_group == g).flatten()  # positions in the active-token list
        ids = sub if meta.all_tokens_active else meta.active_token_ids.index_select(0, sub)
        top = max(sizes[s] for s in members)
        yield top, ids, sl.index_select(0, sub), all(sizes[s] == top for s in members)


def _lora_rows(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """y [n, out] += scale * (x [n, in] @ a [r, in].T) @ b [out, r].T, fp32 intermediate."""
    if y.dtype == torch.float32:
        y.addmm_(torch.mm(x, a.t()), b.t(), alpha=scale)
    else:
        h = torch.mm(x.float(), a.float().t())  # [n, r]
        y.copy_(y.float().addmm_(h, b.float().t(), alpha=scale))


def _gather(pool: torch.Tensor, slots: torch.Tensor, name: str) -> torch.Tensor:
    """pool[slots] as fp32, written into a reused buffer (fresh buffers page-fault, see _Workspace)."""
    shape = (slots.numel(),) + tuple(pool.shape[1:])
    out = _WS.get(name, shape, pool.dtype, pool.device)
    torch.index_select(pool, 0, slots, out=out)
    return _f32(out)


def _gather_up(pool: torch.Tensor, size: int, slots: torch.Tensor, name: str) -> torch.Tensor:
    """pool[slots, :, :size].transpose(1, 2) as fp32 [n, size, out], for ``pool`` [S, out, R] stored either
    way. Stored [S, out, R] (contiguous), the gather copies out*n runs of ``size`` elements: 0.16x of a
    1024x1024 base matmul at n=32, size=16, 1 thread; stored [S, R, out] (``pool`` a transpose view), it
    copies n blocks of size*out contiguous elements: 0.025x."""
    if pool.stride(1) == 1 and pool.shape[1] > 1:  # transposed storage: rows of the [S, R, out] tensor
        return _gather(pool.transpose(1, 2)[:, :size], slots, name)
    return _gather(pool[:, :, :size], slots, name).transpose(1, 2)


def _check_limit(op: str, what: str, values: list[int], slots: list[int], limit: int) -> None:
    worst = max(slots, key=lambda s: values[s])
    if values[worst] > limit:
        raise ValueError(f"{op}: {what}[{worst}] = {values[worst]} exceeds the pool's padded size {limit}")


# ----------------------------------------------------------------------------------------- bottleneck
@one_thread
def add_bottleneck(y: torch.Tensor, u: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor,
                   up_bias: torch.Tensor, scale: torch.Tensor, width: torch.Tensor, act: torch.Tensor,
                   meta: DeltaKernelMeta) -> None:
    """Semantics: for every token t with s = slot[t] >= 0 and m = width[s] > 0:
        y[t] += scale[s] * (act_s(u[t] @ down[s, :m].T + down_bias[s, :m]) @ up[s, :, :m].T + up_bias[s])
    y [T, h] (in place; ``u`` may be ``y`` itself: every row's input is read before it is written),
    u [T, h], down [S, M, h], down_bias [S, M], up [S, h, M], up_bias [S, h], scale fp32 [S],
    width int32 [S], act int32 [S] (ACT_CODES)."""
    if meta.no_delta:
        return
    widths = width.tolist()
    work = [s for s in meta.active_slots_host if widths[s] > 0]
    if not work:
        return
    _check_limit("add_bottleneck", "width", widths, work, down.shape[1])
    acts = act.tolist()
    for s in work:
        if acts[s] not in _ACT_FNS:
            raise ValueError(f"add_bottleneck: act[{s}] = {acts[s]} is not an activation code (0..3)")
    scales = scale.tolist()
    plan = _plan(meta, grouped_ok=reference_grouped.bottleneck_ok(u, down, up), dtype=y.dtype)
    if plan == "grouped":
        reference_grouped.add_bottleneck(y, u, down, down_bias, up, up_bias, scale, act, widths, acts, work, meta)
    elif plan == "runs":
        for a, b, s in meta.runs_host:
            m = widths[s]
            if m:
                h = torch.addmm(_f32(down_bias[s, :m]), _f32(u[a:b]), _f32(down[s, :m]).t())  # [n, m]
                d = torch.addmm(_f32(up_bias[s]), _ACT_FNS[acts[s]](h), _f32(up[s, :, :m]).t())  # [n, h]
                _add_slice(y[a:b], d, scales[s])
    elif plan == "segments":
        ids = meta.sorted_active_ids
        us = u.index_select(0, ids)  # [N, h]; read before y changes (u may alias y)
        ds = _WS.get("seg_d", (ids.numel(), y.shape[1]), torch.float32, y.device)
        for k, s in enumerate(meta.active_slots_host):
            a, b, m = meta.seg_start_host[k], meta.seg_start_host[k + 1], widths[s]
            if m == 0:
                ds[a:b].zero_()
                continue
            h = torch.addmm(_f32(down_bias[s, :m]), _f32(us[a:b]), _f32(down[s, :m]).t())
            torch.addmm(_f32(up_bias[s]), _ACT_FNS[acts[s]](h), _f32(up[s, :, :m]).t(), out=ds[a:b]).mul_(scales[s])
        _add_rows(y, ids, ds)
    else:
        for size, ids, sl, _ in _gather_groups(meta, widths, work):
            _bottleneck_gathered(y, u, down, down_bias, up, up_bias, scale, width, act, ids, sl, size,
                                 sorted({acts[s] for s in work}))


def _bottleneck_gathered(y, u, down, down_bias, up, up_bias, scale, width, act, ids, sl, mmax: int,
                         codes: list[int]) -> None:
    """Gathered plan on tokens ``ids`` (None = all) with slots ``sl`` [n], widths <= mmax; ``u`` may be
    ``y``: groups hold disjoint tokens and each reads its rows before adding to them."""
    n, hid = sl.numel(), y.shape[1]
    us = _f32(u if ids is None else u.index_select(0, ids))  # [n, h]
    h = torch.bmm(us.unsqueeze(1), _gather(down[:, :mmax], sl, "bn_down").transpose(1, 2),
                  out=_WS.get("bn_h", (n, 1, mmax), torch.float32, y.device)).view(n, mmax)
    h.add_(_f32(down_bias[:, :mmax].index_select(0, sl)))
    h = apply_act(h, codes, act.index_select(0, sl) if len(codes) > 1 else None)
    tok_width = width.index_select(0, sl)  # [n]; width 0 = no adapter here, up_bias included
    h.mul_(torch.arange(mmax, device=y.device) < tok_width.unsqueeze(1))  # past the slot's width: 0
    d = torch.bmm(h.unsqueeze(1), _gather_up(up, mmax, sl, "bn_up"),
                  out=_WS.get("bn_d", (n, 1, hid), torch.float32, y.device)).view(n, hid)
    d.add_(_f32(up_bias.index_select(0, sl))).mul_((scale.index_select(0, sl) * (tok_width > 0)).unsqueeze(1))
    _add_rows(y, ids, d)


def _add_slice(y: torch.Tensor, d: torch.Tensor, scale: float) -> None:
    if y.dtype == torch.float32:
        y.add_(d, alpha=scale)
    else:
        y.copy_(y.float().add_(d, alpha=scale))


# ------------------------------------------------------------------------------------- BitFit, (IA)3
@one_thread
def add_bias(y: torch.Tensor, bias: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """Semantics: y[t] += bias[slot[t]] for slot[t] >= 0.   y [T, out] (in place), bias [S, out]."""
    if meta.no_delta:
        return
    if len(meta.runs_host) <= ROWS_MAX_RUNS:
        for a, b, s in meta.runs_host:
            _add_slice(y[a:b], _f32(bias[s]), 1.0)
        return
    ids = _gather_ids(meta)
    _add_rows(y, ids, _f32(bias.index_select(0, meta.active_token_slots)))


@one_thread
def mul_rows(t: torch.Tensor, vec: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """Semantics: t[i] *= vec[slot[i]] for slot[i] >= 0.   t [T, n] (in place), vec [S, n]."""
    if meta.no_delta:
        return
    if len(meta.runs_host) <= ROWS_MAX_RUNS:
        for a, b, s in meta.runs_host:
            if t.dtype == torch.float32:
                t[a:b].mul_(vec[s])
            else:
                t[a:b].copy_(t[a:b].float().mul_(vec[s].float()))
        return
    rows = _f32(vec.index_select(0, meta.active_token_slots))  # [N, n]
    ids = _gather_ids(meta)
    if ids is None:
        if t.dtype == torch.float32:
            t.mul_(rows)
        else:
            t.copy_(t.float().mul_(rows))
    else:
        t.index_copy_(0, ids, t.index_select(0, ids).float().mul_(rows).to(t.dtype))
