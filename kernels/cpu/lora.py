"""LoRA on the CPU backend: ``cpu_add_lora`` picks a plan (``plans.choose_plan``) and runs it."""
from __future__ import annotations

import weakref

import torch

from ..meta import DeltaKernelMeta
from ..pages import LoraPages
from . import gather, grouped, looped, strided
from .plans import FEW_RUNS, choose_plan, plan_forced
from .tensors import WS, add_rows, f32
from .threads import on_op_threads


@on_op_threads
def cpu_add_lora(y: torch.Tensor, x: torch.Tensor, pages: LoraPages, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.add_lora`` (which checks the arguments; semantics and shapes there).
    Reads only each active slot's own rows; a run leaving the row tensors is a ValueError."""
    if meta.no_delta or pages.max_rank == 0:
        return
    ranks, starts = gather.active_values(pages, "rank", meta), gather.active_values(pages, "start", meta)
    scales = gather.active_values(pages, "scale", meta)  # the host mirrors when the pages have them
    runs = meta.runs_host
    if len(runs) <= FEW_RUNS and not plan_forced():  # decode or prefill of a few sequences: no plan to choose
        whole = len(runs) == 1 and meta.all_tokens_active  # one run of every token: no row slices
        for a, b, s in runs:
            r = ranks[s]
            if r:
                a_t, b_r = _views(pages, starts[s], r, s)
                _rows(y if whole else y[a:b], x if whole else x[a:b], a_t, b_r, scales[s])
        return
    def working() -> list[int]:
        return [s for s in meta.active_slots_host if ranks[s] > 0]

    def one_group() -> bool:
        work = working()
        return len(work) == meta.num_active and len({gather.rank_group(ranks[s]) for s in work}) == 1

    def grouped_ok() -> bool:
        return grouped.lora_ok(x, pages.a_rows, pages.b_rows)

    plan = choose_plan(meta, padded_ok=one_group, grouped_ok=grouped_ok, dtype=y.dtype,
                       native_ok=lambda: looped.usable_with(pages, LORA_TENSORS, y, x))
    if plan == "native":  # the loop reads the tables and checks the runs itself
        add_long_runs(y, x, pages, meta)
        looped.native_lora(y, x, pages, meta)
        return
    work = working()
    if not work:
        return  # no active slot has LoRA at this layer
    gather.check_runs("add_lora", "rank", starts, ranks, work, pages.a_rows.shape[0])
    if plan == "strided":
        strided.strided_lora(y, x, pages, ranks, starts, work, meta)
    elif plan == "grouped":
        grouped.grouped_lora(y, x, pages, ranks, starts, work, meta)
    elif plan == "padded":
        rmax = max(ranks[s] for s in work)
        _padded(y, x, pages, meta, rmax, all(ranks[s] == rmax for s in work))
    elif plan == "runs":
        whole = len(runs) == 1 and meta.all_tokens_active
        for a, b, s in runs:
            r = ranks[s]
            if r:
                a_t, b_r = _views(pages, starts[s], r, s)
                _rows(y if whole else y[a:b], x if whole else x[a:b], a_t, b_r, scales[s])
    elif plan == "segments":
        _segments(y, x, pages, scales, ranks, starts, meta)
    else:
        for size, ids, sl, uniform in gather.groups(meta, ranks, work):
            _gathered(y, x, pages, ids, sl, size, uniform)


LORA_TENSORS = ("a_rows", "b_rows", "scale")


def add_long_runs(y: torch.Tensor, x: torch.Tensor, pages: LoraPages, meta: DeltaKernelMeta) -> None:
    """The native plan's long runs (``looped.split``: prefill chunks beside decode tokens): two matmuls each on their
    row slices, as the runs plan; the loop takes the other tokens."""
    long = looped.split(meta).long
    if not long:
        return
    ranks, starts = gather.active_values(pages, "rank", meta), gather.active_values(pages, "start", meta)
    scales = gather.active_values(pages, "scale", meta)
    for a, b, s in long:
        r = ranks[s]
        if r:
            a_t, b_r = _views(pages, starts[s], r, s)
            _rows(y[a:b], x[a:b], a_t, b_r, scales[s])

_VIEWS: "weakref.WeakKeyDictionary[LoraPages, dict]" = weakref.WeakKeyDictionary()


def _views(pages: LoraPages, start: int, rank: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_s.T [in, r], B_s.T [r, out]) of the run ``start`` .. ``start + rank``: views kept per pages object (the
    layers hand the same one to every step until their storage moves), so a decode step does not slice the
    row tensors twice per wrapped module (2 slices + a transpose were 6 us of a 66 us add_lora at T = 1).
    A run leaving the row tensors is refused here, once per run."""
    cache = _VIEWS.get(pages)
    if cache is None:
        cache = _VIEWS[pages] = {}
    hit = cache.get((start, rank))
    if hit is None:
        n = pages.a_rows.shape[0]
        if start < 0 or start + rank > n:
            raise ValueError(f"add_lora: slot {slot}: rank {rank} from row {start} leaves the {n} rows of the pages")
        hit = cache[(start, rank)] = (pages.a_rows[start:start + rank].t(), pages.b_rows[start:start + rank])
    return hit


def _rows(y: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """Runs plan, one run: y [n, out] += scale * (x [n, in] @ a_t [in, r]) @ b [r, out], fp32 intermediate."""
    if y.dtype == torch.float32:
        y.addmm_(torch.mm(x, a_t), b, alpha=scale)
    else:
        h = torch.mm(x.float(), a_t.float())  # [n, r]
        y.copy_(y.float().addmm_(h, b.float(), alpha=scale))


def _segments(y, x, pages: LoraPages, scales: dict, ranks: dict, starts: dict, meta: DeltaKernelMeta) -> None:
    """Segments plan: tokens gathered grouped by slot, one matmul pair per slot on views of its rows,
    scattered back."""
    ids = meta.sorted_active_ids  # [N]
    xs = x.index_select(0, ids)  # [N, in]
    ds = WS.get("seg_d", (ids.numel(), y.shape[1]), torch.float32, y.device)  # [N, out]
    for k, s in enumerate(meta.active_slots_host):
        a, b, r = meta.seg_start_host[k], meta.seg_start_host[k + 1], ranks[s]
        if r == 0:
            ds[a:b].zero_()
            continue
        st = starts[s]
        h = torch.mm(f32(xs[a:b]), f32(pages.a_rows[st:st + r]).t())  # [n_s, r] fp32
        torch.mm(h, f32(pages.b_rows[st:st + r]), out=ds[a:b]).mul_(scales[s])
    add_rows(y, ids, ds)


def _padded(y, x, pages: LoraPages, meta: DeltaKernelMeta, rmax: int, uniform: bool) -> None:
    """Padded plan: each active slot's tokens padded to the longest segment L, so the weights are gathered
    once per *slot* (not per token) and two batched matmuls [A, L, in] @ [A, in, rmax] @ [A, rmax, out] do
    the rest. Decode (L = 1) is the gathered plan; 64 tokens on 32 slots gather half the bytes. Every active
    slot has LoRA here (``cpu_add_lora`` checks), so every gathered row is one of its own."""
    num_act, seg, n = meta.num_active, meta.max_seg_len, meta.num_active_tokens
    ids, pos = meta.sorted_active_ids, meta.padded_positions  # [N] tokens by slot, [N] their padded row
    slots = meta.active_slots.long()  # [A]
    xs = WS.get("pad_x", (num_act * seg, x.shape[1]), torch.float32, y.device)  # [A*L, in]
    if n < num_act * seg:
        xs.zero_()
    xs.index_copy_(0, pos, f32(x.index_select(0, ids)))
    rows = gather.row_index(pages.start, pages.rank, slots, rmax)  # [A, rmax]
    h = torch.bmm(xs.view(num_act, seg, -1), gather.rows(pages.a_rows, rows, "pad_a").transpose(1, 2),
                  out=WS.get("pad_h", (num_act, seg, rmax), torch.float32, y.device))  # [A, L, rmax]
    coef = pages.scale.index_select(0, slots).view(num_act, 1, 1)  # [A, 1, 1]
    if not uniform:
        coef = coef * (torch.arange(rmax, device=y.device) < pages.rank.index_select(0, slots).view(num_act, 1, 1))
    h.mul_(coef)
    d = torch.bmm(h, gather.rows(pages.b_rows, rows, "pad_b"),
                  out=WS.get("pad_d", (num_act, seg, y.shape[1]), torch.float32, y.device))  # [A, L, out]
    d = d.view(num_act * seg, -1)
    add_rows(y, ids, d if n == num_act * seg else d.index_select(0, pos))


def _gathered(y, x, pages: LoraPages, ids, sl, rmax: int, uniform: bool) -> None:
    """Gathered plan on tokens ``ids`` (None = all, in order) whose slots are ``sl`` [n], ranks <= rmax.
    Per token, [1, in] @ [in, rmax] then [1, rmax] @ [rmax, out] as batched matmuls: this orientation
    is ~40x faster in MKL than the matrix-vector one (0.06 vs 2.8 ms at n=32, r=16, in=1024)."""
    n = sl.numel()
    xs = f32(x if ids is None else x.index_select(0, ids))  # [n, in]
    rows = gather.row_index(pages.start, pages.rank, sl, rmax)  # [n, rmax], clamped to each slot's run
    a_g = gather.rows(pages.a_rows, rows, "lora_a")  # [n, rmax, in]
    h = torch.bmm(xs.unsqueeze(1), a_g.transpose(1, 2),
                  out=WS.get("lora_h", (n, 1, rmax), torch.float32, y.device))  # [n, 1, rmax]
    # The slot's scale on its own ranks, 0 beyond them (the clamped rows repeat the slot's last row); no mask
    # when every slot here has rank rmax (the common case: one rank for all tenants).
    coef = pages.scale.index_select(0, sl).unsqueeze(1)  # [n, 1]
    if not uniform:
        coef = coef * (torch.arange(rmax, device=y.device) < pages.rank.index_select(0, sl).unsqueeze(1))  # [n, rmax]
    h.view(n, rmax).mul_(coef)
    d = torch.bmm(h, gather.rows(pages.b_rows, rows, "lora_b"),
                  out=WS.get("lora_d", (n, 1, y.shape[1]), torch.float32, y.device))  # [n, 1, out]
    add_rows(y, ids, d.view(n, y.shape[1]))
