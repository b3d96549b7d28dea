"""The grouped plan of the CPU backend: ``F.grouped_mm`` over the whole slot pool, nothing gathered.

Tokens sorted by slot are multiplied against the *whole* pool in place, with ``offs`` the cumulative
per-slot token counts over all ``S`` slots (a slot without tokens is an empty group)::

    h = F.grouped_mm(x_sorted [n, in], lora_a[:, :r].transpose(1, 2) [S, in, r], offs=offs)   # [n, r]
    h *= scale[slot of each row]
    y[ids] += F.grouped_mm(h, lora_b_t[:, :r] [S, r, out], offs=offs)                          # [n, out]

so no token's A or B rows are copied: at decode (T=32 tokens of 32 distinct rank-16 slots, S=40) the
gathered plan's ``index_select`` of A and B was 16 of the 35 ms of LoRA work per step of the CPU
benchmark Llama. On a 1024 -> 2816 projection, 1 thread: shrink 0.10 ms, expand 0.17 ms with the B pool
stored [S, R, out] (0.30 ms as a transpose view of [S, out, R]), against 2.96 ms for the base matmul.

D3: ``grouped_mm`` needs one inner size for all groups, so the plan runs one shrink/expand pair per
distinct active rank ``r`` over the rank-sliced pool ``lora_a[:, :r]`` (never past a slot's rank: the
padding may hold a previous tenant's values, or NaN), fed only that rank's tokens; the other slots are
empty groups. Bottleneck adapters do the same per distinct width, with the biases, the activation per
slot code and the scale applied to the small [n, m] / [n, h] results.

Intermediates: fp32 pools give fp32 ``h``. On the CPU, ``grouped_mm`` on fp16/bf16 accumulates in fp32
but returns the input dtype (``out_dtype`` must match), so ``h`` is rounded to the pool dtype before the
expand, exactly as the CUDA Triton kernel does (``ht.to(wt.dtype)`` before its second ``tl.dot``); the
scale, biases and activation are applied in fp32. Only CPU tensors use this plan: on CUDA,
``grouped_mm`` wants bf16 with 16-byte aligned strides (rank 1 or 4 would be refused), and there the
Triton kernels serve.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..meta import DeltaKernelMeta
from .tensors import add_rows, apply_act, f32

# ------------------------------------------------------------------------------- capability probe
_SUPPORTED: dict[tuple[str, torch.dtype], bool] = {}


def _probe(dtype: torch.dtype) -> bool:
    """grouped_mm on the CPU in ``dtype``: runs, and matches a per-group loop on a case with an empty
    group, a rank-sliced A view and a B pool sliced from [S, R, out] storage (sizes aligned, see
    ``layout_ok``)."""
    if not hasattr(F, "grouped_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 8, 16, generator=g) / 4).to(dtype)  # [S, R, in]
    b = (torch.randn(3, 8, 16, generator=g) / 2).to(dtype)  # [S, R, out]
    x = torch.randn(5, 16, generator=g).to(dtype)  # [n, in]: 2 rows of slot 0, none of slot 1, 3 of slot 2
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    try:
        h = F.grouped_mm(x, a[:, :4].transpose(1, 2), offs=offs)  # [5, 4]
        d = F.grouped_mm(h, b[:, :4], offs=offs)  # [5, 16]
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    want = torch.cat([x[:2].double() @ a[0, :4].double().T @ b[0, :4].double(),
                      x[2:].double() @ a[2, :4].double().T @ b[2, :4].double()])  # [5, 16]
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # |want| ~ 1; bf16 keeps 8 bits, rounded twice
    return d.shape == (5, 16) and torch.allclose(d.double(), want, atol=tol, rtol=tol)


def _align(dtype: torch.dtype) -> int:
    return max(1, 16 // torch.empty(0, dtype=dtype).element_size())


def layout_ok(t: torch.Tensor) -> bool:
    """Whether ``t`` passes grouped_mm's layout check (torch 2.13, CPU and CUDA alike): one of the two
    innermost dims has unit stride and the other's stride is a multiple of 16 bytes. A pool whose
    ``in`` is not a multiple of 4 (fp32) or 8 (fp16/bf16) fails it; that layer keeps the other plans."""
    sm, sn = t.stride(-2), t.stride(-1)
    m, n = t.shape[-2], t.shape[-1]
    if sn == 1 and sm >= max(1, n):
        return sm % _align(t.dtype) == 0
    if sm == 1 and sn >= max(1, m):
        return sn % _align(t.dtype) == 0
    return False


def aligned_empty(n: int, m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An [n, m] tensor whose row stride is a multiple of 16 bytes, as grouped_mm's inputs need (its own
    outputs are laid out that way: a [32, 4] fp16 result has row stride 8)."""
    a = _align(dtype)
    return torch.empty(n, -(-m // a) * a, dtype=dtype, device=device)[:, :m]


PREFERRED_DTYPES = (torch.float32,)
"""Dtypes for which the plan chooser picks this plan by itself. On this CPU (1 thread, T=32 tokens of 32
slots, rank 16, 1024 -> 2816) it takes 0.84 ms in fp32 against 1.66 ms for the gathered plan, but in
fp16 1.95 ms against 1.84 and in bf16 2.76 ms against 1.83: CPU grouped_mm computes half types without
the fp32 GEMM kernels the gathered plan reaches by casting. The plan stays correct there (tests force it)."""


def supported(t: torch.Tensor) -> bool:
    """Whether the grouped plan can run on tensors like ``t`` (probed once per dtype, CPU only)."""
    if t.device.type != "cpu":
        return False
    key = (t.device.type, t.dtype)
    ok = _SUPPORTED.get(key)
    if ok is None:
        ok = _SUPPORTED[key] = _probe(t.dtype)
    return ok


for _dt in (torch.float32, torch.float16, torch.bfloat16):  # once at import: ~1 ms in all
    supported(torch.empty(0, dtype=_dt))


# ------------------------------------------------------------------------------ token groups per step
class _Group:
    """One grouped_mm pair's tokens: those of the slots whose rank (or width) is ``size``. The pool is
    sliced to the slots ``lo:hi`` spanned by the group: each empty group still costs grouped_mm ~1 us."""

    __slots__ = ("size", "ids", "slots", "offs", "num_tokens", "lo", "hi")

    def __init__(self, size: int, ids: torch.Tensor | None, slots: torch.Tensor, offs: torch.Tensor, n: int,
                 lo: int, hi: int):
        self.size = size
        self.ids = ids  # int64 [n] token ids grouped by slot; None: all T tokens, already in slot order
        self.slots = slots  # int64 [n] slot of each row
        self.offs = offs  # int32 [hi - lo] cumulative token counts of slots lo..hi-1 (0 outside the group)
        self.num_tokens = n
        self.lo, self.hi = lo, hi


_GROUPS: "weakref.WeakKeyDictionary[DeltaKernelMeta, dict]" = weakref.WeakKeyDictionary()


def groups(meta: DeltaKernelMeta, sizes: list[int], work: list[int]) -> list[_Group]:
    """The token groups of ``meta`` for per-slot ``sizes`` (rank or width, a host list over all S slots)
    restricted to ``work`` (active slots with size > 0). Cached on the step's meta: the 28 wrapped
    projections of a 4-layer Llama usually share one rank layout, so the index tensors are built once."""
    by_size: dict[int, list[int]] = {}
    for s in work:
        by_size.setdefault(sizes[s], []).append(s)
    key = (len(sizes), tuple((r, tuple(m)) for r, m in sorted(by_size.items())))
    cache = _GROUPS.setdefault(meta, {})
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = [_build(meta, len(sizes), r, members) for r, members in sorted(by_size.items())]
    return hit


def _build(meta: DeltaKernelMeta, num_slots: int, size: int, members: list[int]) -> _Group:
    dev = meta.token_slots.device
    chosen = set(members)
    counts = [0] * num_slots
    pos: list[int] = []  # positions in the sorted active-token list
    for k, s in enumerate(meta.active_slots_host):
        if s in chosen:
            a, b = meta.seg_start_host[k], meta.seg_start_host[k + 1]
            counts[s] = b - a
            pos.extend(range(a, b))
    n = len(pos)
    lo, hi = members[0], members[-1] + 1  # members are sorted (active slots in order)
    offs = torch.tensor(counts[lo:hi], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)  # [hi - lo]
    slots = torch.repeat_interleave(torch.tensor(members, dtype=torch.int64),
                                    torch.tensor([counts[s] for s in members])).to(dev)  # [n]
    if n == meta.num_tokens and _in_slot_order(meta):
        ids = None  # prefill with sequences in slot order: no gather, no scatter
    elif n == meta.num_active_tokens:
        ids = meta.sorted_active_ids
    else:
        ids = meta.sorted_active_ids.index_select(0, torch.tensor(pos, dtype=torch.int64, device=dev))
    return _Group(size, ids, slots, offs, n, lo, hi)


def _in_slot_order(meta: DeltaKernelMeta) -> bool:
    """Every token has a slot and tokens are already sorted by slot (one run per slot, ascending)."""
    runs = meta.runs_host
    return meta.all_tokens_active and all(runs[i][2] < runs[i + 1][2] for i in range(len(runs) - 1))


def _rows(t: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """t[ids] (a contiguous copy), or ``t`` itself as a contiguous tensor when ``ids`` is None."""
    if ids is None:
        return t.contiguous()
    return t.index_select(0, ids)


# ------------------------------------------------------------------------------------------- the ops
def lora_ok(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether grouped_lora below can run on these tensors: grouped_mm works for the device and dtype, and the
    token rows [n, in] and the A / B pool views pass its layout check (rank slices keep the strides)."""
    return (supported(x) and x.shape[1] % _align(x.dtype) == 0 and layout_ok(lora_a.transpose(1, 2))
            and layout_ok(lora_b.transpose(1, 2)))


def bottleneck_ok(u: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> bool:
    """As :func:`lora_ok` for grouped_bottleneck (rows [n, h], down [S, h, M] and up [S, M, h] views)."""
    return (supported(u) and u.shape[1] % _align(u.dtype) == 0 and layout_ok(down.transpose(1, 2))
            and layout_ok(up.transpose(1, 2)))


def grouped_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
                 ranks: list[int], work: list[int], meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T for the tokens of ``work`` slots
    (active, rank > 0; ``ranks`` the host copy of the rank pool). Shapes as ``kernels.add_lora``."""
    b_rows = lora_b.transpose(1, 2)  # [S, R, out]: contiguous rows when the pool is stored that way
    for grp in groups(meta, ranks, work):
        r = grp.size
        xs = _rows(x, grp.ids)  # [n, in]
        h = F.grouped_mm(xs, lora_a[grp.lo:grp.hi, :r].transpose(1, 2), offs=grp.offs)  # [n, r]
        h.mul_(scale.index_select(0, grp.slots).unsqueeze(1))  # [n, 1] fp32 scale; rounded once if fp16
        d = F.grouped_mm(h, b_rows[grp.lo:grp.hi, :r], offs=grp.offs)  # [n, out]
        add_rows(y, grp.ids, d)


def grouped_bottleneck(y: torch.Tensor, u: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
                       up: torch.Tensor, up_bias: torch.Tensor, scale: torch.Tensor, act: torch.Tensor,
                       widths: list[int], acts: list[int], work: list[int], meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (act_s(u[t] @ down[s, :m].T + down_bias[s, :m]) @ up[s, :, :m].T + up_bias[s]) for
    the tokens of ``work`` slots (active, width > 0). ``u`` may be ``y``: every group's rows are read
    before any group adds to ``y`` (groups hold disjoint tokens)."""
    grps = groups(meta, widths, work)
    inputs = [_rows(u, g.ids) for g in grps]  # [n, h] each; copies unless one group covers every token
    up_rows = up.transpose(1, 2)  # [S, M, h]
    for grp, us in zip(grps, inputs):
        m = grp.size
        h = f32(F.grouped_mm(us, down[grp.lo:grp.hi, :m].transpose(1, 2), offs=grp.offs))  # [n, m] fp32
        h.add_(down_bias[:, :m].index_select(0, grp.slots))
        codes = sorted({acts[s] for s in work if widths[s] == m})
        hp = aligned_empty(grp.num_tokens, m, up.dtype, y.device)  # [n, m], row stride 16-byte aligned
        hp.copy_(apply_act(h, codes, act.index_select(0, grp.slots) if len(codes) > 1 else None))
        d = f32(F.grouped_mm(hp, up_rows[grp.lo:grp.hi, :m], offs=grp.offs))  # [n, h] fp32
        d.add_(up_bias.index_select(0, grp.slots)).mul_(scale.index_select(0, grp.slots).unsqueeze(1))
        add_rows(y, grp.ids, d)
