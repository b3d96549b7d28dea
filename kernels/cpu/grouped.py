"""The grouped plan of the CPU backend: ``F.grouped_mm`` over strided views of the pages, nothing gathered.

Tokens sorted by cell are multiplied against a ``[G, r, in]`` view of the row tensor whose G cells are evenly
spaced runs of r rows (``stride`` rows apart from row ``first``), ``offs`` the cumulative per-cell token
counts (a cell without tokens is an empty group)::

    A = a_rows.as_strided((G, r, in), (stride * rs, rs, 1), first * rs)        # rs = row stride
    h = F.grouped_mm(x_sorted [n, in], A.transpose(1, 2) [G, in, r], offs=offs)   # [n, r]
    h *= scale[slot of each row]
    y[ids] += F.grouped_mm(h, B [G, r, out], offs=offs)                            # [n, out]

so no token's A or B rows are copied: at decode (T=32 tokens of 32 distinct rank-16 deltas) the gathered
plan's ``index_select`` of A and B was 16 of the 35 ms of LoRA work per step of the CPU benchmark Llama. On a
1024 -> 2816 projection, 1 thread: shrink 0.10 ms, expand 0.17 ms, against 2.96 ms for the base matmul.

Views need evenly spaced cells. The server's arenas give every rank bucket its own region of equal cells
(``server/deltas/pages.py``), so the slots of one rank form one lattice; the pages may place runs
anywhere, so the active slots of one rank are cut into *clusters*: runs sorted by start whose gaps share a
common stride >= r, with at most ``MAX_EMPTY`` empty cells per cluster member (each empty group costs
grouped_mm ~1-2.5 us, a new cluster ~25 us). Slots scattered beyond that get one cluster each.

D3: ``grouped_mm`` needs one inner size for all groups, so the plan runs one shrink/expand pair per cluster
of one true rank ``r`` (never past a slot's rank: rows there may hold a previous tenant's values, or NaN),
fed only that cluster's tokens. Bottleneck adapters do the same per width, with the biases, the activation
per slot code and the scale applied to the small [n, m] / [n, h] results.

Intermediates: fp32 pages give fp32 ``h``. On the CPU, ``grouped_mm`` on fp16/bf16 accumulates in fp32
but returns the input dtype (``out_dtype`` must match), so ``h`` is rounded to the pages' dtype before the
expand, exactly as the CUDA Triton kernel does (``ht.to(wt.dtype)`` before its second ``tl.dot``); the
scale, biases and activation are applied in fp32. Only CPU tensors use this plan: on CUDA,
``grouped_mm`` wants bf16 with 16-byte aligned strides (rank 1 or 4 would be refused), and there the
Triton kernels serve.
"""
from __future__ import annotations

import math
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


_ALIGN: dict[torch.dtype, int] = {}


def _align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes (grouped_mm's alignment); cached: building the probe tensor cost ~5 us a call, and
    ``lora_ok`` asks three times per op (34 us of a 39 us rank-8 LoRA at T=1 went to these checks)."""
    a = _ALIGN.get(dtype)
    if a is None:
        a = _ALIGN[dtype] = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    return a


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
MAX_EMPTY = 4
"""Empty cells a cluster may carry per member (see the module docstring)."""


class _Group:
    """One grouped_mm pair's tokens: those of a cluster of slots of one rank (or width) ``size`` whose runs
    start at ``first + k * stride`` rows, k < ``num_cells`` (cells without a member are empty groups), with
    ``first`` the start of ``members[0]`` (looked up per layer: layers place the same cells at other rows)."""

    __slots__ = ("size", "members", "ids", "slots", "offs", "num_tokens", "stride", "num_cells")

    def __init__(self, size: int, members: list[int], ids: torch.Tensor | None, slots: torch.Tensor,
                 offs: torch.Tensor, n: int, stride: int, num_cells: int):
        self.size = size
        self.members = members  # slots in cell order
        self.ids = ids  # int64 [n] token ids grouped by cell; None: all T tokens, already in that order
        self.slots = slots  # int64 [n] slot of each row
        self.offs = offs  # int32 [num_cells] cumulative token counts per cell
        self.num_tokens = n
        self.stride, self.num_cells = stride, num_cells

    def view(self, rows: torch.Tensor, first: int) -> torch.Tensor:
        """[num_cells, size, K] cells of ``rows`` [N, K] (unit last stride) from row ``first``: strided, no copy."""
        rs = rows.stride(0)
        return rows.as_strided((self.num_cells, self.size, rows.shape[1]), (self.stride * rs, rs, 1),
                               rows.storage_offset() + first * rs)


_GROUPS: "weakref.WeakKeyDictionary[DeltaKernelMeta, dict]" = weakref.WeakKeyDictionary()


def groups(meta: DeltaKernelMeta, sizes: dict[int, int], starts: dict[int, int], work: list[int]) -> list[_Group]:
    """The token groups of ``meta`` for per-slot ``sizes`` (rank or width) and run ``starts`` (host dicts over
    the active slots) restricted to ``work`` (active slots with size > 0). Cached on the step's meta by the
    layout *relative to each rank's first run*: the wrapped projections of a model usually hold the same
    deltas in the same cells of regions that start at different rows, so the index tensors are built once
    per step, not once per layer."""
    by_size: dict[int, list[int]] = {}
    for s in work:
        by_size.setdefault(sizes[s], []).append(s)
    key = []
    for r, group in sorted(by_size.items()):
        base = min(starts[s] for s in group)
        key.append((r, tuple(sorted((starts[s] - base, s) for s in group))))
    key = tuple(key)
    cache = _GROUPS.setdefault(meta, {})
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = [_build(meta, r, members, first, stride, cells, starts)
                            for r, group in sorted(by_size.items())
                            for members, first, stride, cells in _clusters(group, starts, r)]
    return hit


def _clusters(slots: list[int], starts: dict[int, int], size: int):
    """(members in start order, first row, stride, cells) for runs of ``size`` rows, cut where the gaps stop
    sharing a stride >= size or a cluster would carry more than MAX_EMPTY empty cells per member."""
    order = sorted(slots, key=lambda s: starts[s])
    members, stride = [order[0]], 0
    for s in order[1:]:
        g = math.gcd(stride, starts[s] - starts[members[-1]])
        cells = (starts[s] - starts[members[0]]) // g + 1 if g else 1
        if g >= size and cells <= (MAX_EMPTY + 1) * (len(members) + 1):
            members.append(s)
            stride = g
            continue
        yield members, starts[members[0]], max(stride, size), _cells(members, starts, stride)
        members, stride = [s], 0
    yield members, starts[members[0]], max(stride, size), _cells(members, starts, stride)


def _cells(members: list[int], starts: dict[int, int], stride: int) -> int:
    return (starts[members[-1]] - starts[members[0]]) // stride + 1 if stride else 1


def _build(meta: DeltaKernelMeta, size: int, members: list[int], first: int, stride: int, cells: int,
           starts: dict[int, int]) -> _Group:
    dev = meta.token_slots.device
    seg = {s: k for k, s in enumerate(meta.active_slots_host)}
    counts = [0] * cells
    pos: list[int] = []  # positions in the sorted active-token list, member by member
    member_counts = []
    for s in members:
        k = seg[s]
        a, b = meta.seg_start_host[k], meta.seg_start_host[k + 1]
        counts[(starts[s] - first) // stride] = b - a
        member_counts.append(b - a)
        pos.extend(range(a, b))
    n = len(pos)
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)  # [cells]
    slots = torch.tensor([s for s, c in zip(members, member_counts) for _ in range(c)],
                         dtype=torch.int64).to(dev)  # [n]; a list: repeat_interleave costs ms on busy cores
    if n == meta.num_tokens and _in_member_order(meta, members):
        ids = None  # prefill with sequences in cell order: no gather, no scatter
    elif n == meta.num_active_tokens and members == sorted(members):
        ids = meta.sorted_active_ids
    else:
        ids = meta.sorted_active_ids.index_select(0, torch.tensor(pos, dtype=torch.int64, device=dev))
    return _Group(size, members, ids, slots, offs, n, stride, cells)


def _in_member_order(meta: DeltaKernelMeta, members: list[int]) -> bool:
    """Every token has a slot and the tokens are already grouped in member order (one run per member)."""
    runs = meta.runs_host
    return meta.all_tokens_active and len(runs) == len(members) and all(r[2] == s for r, s in zip(runs, members))


def _rows(t: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """t[ids] (a contiguous copy), or ``t`` itself as a contiguous tensor when ``ids`` is None."""
    if ids is None:
        return t.contiguous()
    return t.index_select(0, ids)


# ------------------------------------------------------------------------------------------- the ops
def lora_ok(x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor) -> bool:
    """Whether grouped_lora below can run on these tensors: grouped_mm works for the device and dtype, and the
    token rows [n, in] and the A / B cell views pass its layout check (row strides and offsets aligned)."""
    return (supported(x) and x.shape[1] % _align(x.dtype) == 0 and _rows_ok(a_rows) and _rows_ok(b_rows))


def bottleneck_ok(u: torch.Tensor, down_rows: torch.Tensor, up_rows: torch.Tensor) -> bool:
    """As :func:`lora_ok` for grouped_bottleneck (rows [n, h], down and up cell views)."""
    return (supported(u) and u.shape[1] % _align(u.dtype) == 0 and _rows_ok(down_rows) and _rows_ok(up_rows))


def _rows_ok(rows: torch.Tensor) -> bool:
    """Cell views of ``rows`` pass grouped_mm's layout check: unit last stride, a 16-byte multiple row stride
    and a 16-byte aligned first element (a column slice of an arena must start on an aligned column)."""
    a = _align(rows.dtype)
    return rows.stride(-1) == 1 and rows.stride(0) % a == 0 and rows.storage_offset() % a == 0


def grouped_lora(y: torch.Tensor, x: torch.Tensor, pages, ranks: dict[int, int], starts: dict[int, int],
                 work: list[int], meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (x[t] @ A_s.T) @ B_s.T for the tokens of ``work`` slots (active, rank > 0; ``ranks``
    and ``starts`` the host values of the pages' tables). Shapes as ``kernels.add_lora``."""
    for grp in groups(meta, ranks, starts, work):
        xs = _rows(x, grp.ids)  # [n, in]
        first = starts[grp.members[0]]
        h = F.grouped_mm(xs, grp.view(pages.a_rows, first).transpose(1, 2), offs=grp.offs)  # [n, r]
        h.mul_(pages.scale.index_select(0, grp.slots).unsqueeze(1))  # [n, 1] fp32 scale; rounded once if fp16
        d = F.grouped_mm(h, grp.view(pages.b_rows, first), offs=grp.offs)  # [n, out]
        add_rows(y, grp.ids, d)


def grouped_bottleneck(y: torch.Tensor, u: torch.Tensor, pages, widths: dict[int, int], starts: dict[int, int],
                       acts: dict[int, int], work: list[int], meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s) for the tokens of ``work`` slots (active,
    width > 0). ``u`` may be ``y``: every group's rows are read before any group adds to ``y`` (groups hold
    disjoint tokens)."""
    grps = groups(meta, widths, starts, work)
    inputs = [_rows(u, g.ids) for g in grps]  # [n, h] each; copies unless one group covers every token
    for grp, us in zip(grps, inputs):
        m, first = grp.size, starts[grp.members[0]]
        h = f32(F.grouped_mm(us, grp.view(pages.down_rows, first).transpose(1, 2), offs=grp.offs))  # [n, m] fp32
        h.add_(f32(pages.down_bias.index_select(0, _bias_index(pages.start, grp.slots, m))).view(-1, m))
        codes = sorted({acts[s] for s in grp.members})
        hp = aligned_empty(grp.num_tokens, m, pages.up_rows.dtype, y.device)  # [n, m], row stride 16-byte aligned
        hp.copy_(apply_act(h, codes, pages.act.index_select(0, grp.slots) if len(codes) > 1 else None))
        d = f32(F.grouped_mm(hp, grp.view(pages.up_rows, first), offs=grp.offs))  # [n, h] fp32
        ub = pages.up_bias_rows.index_select(0, pages.up_bias_row.index_select(0, grp.slots).long())  # [n, h]
        d.add_(f32(ub)).mul_(pages.scale.index_select(0, grp.slots).unsqueeze(1))
        add_rows(y, grp.ids, d)


def _bias_index(start: torch.Tensor, slots: torch.Tensor, m: int) -> torch.Tensor:
    """int64 [n * m]: the down-bias rows start[s] .. start[s] + m - 1 of each row's slot."""
    first = start.index_select(0, slots).long().unsqueeze(1)  # [n, 1]
    return (first + torch.arange(m, device=start.device)).reshape(-1)
