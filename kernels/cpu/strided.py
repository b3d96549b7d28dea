"""The strided plan of the CPU backend: ``torch.bmm`` straight on strided views of the pages' cells, tokens padded
per cell, nothing gathered but the token rows.

At decode a cell (one slot's run of rows) holds one or a few tokens, and the work is reading its rows once.
``F.grouped_mm`` on the CPU walks its groups in C++ with a slice, an ``item()`` and a full ``mm`` dispatch per
group (~7 us a group); ``torch.bmm`` hands the whole batch to MKL's batched GEMM (~3.2 us a cell of 16 x 1024
fp32, which is reading 64 KB at ~20 GB/s, this core's L3 read rate). Measured, 1 thread, rank 16,
1024 -> 1024, 32 cells of one token: shrink + expand 200 us with bmm against 470 us with grouped_mm; with 8
tokens a cell 360 against 830.

Blocks. The active cells of one rank (D3: one true rank ``r`` per bmm, never a row past a slot's rank) are cut
into *blocks*: ``cells`` cells evenly spaced ``stride`` rows apart from the start of the block's first member,
every cell padded to the block's ``L`` tokens. One block is one bmm pair::

    A = a_rows.as_strided((cells, in, r), (stride * rs, 1, rs), start * rs)   # A cells transposed: no copy
    h = bmm(xs [cells, L, in], A)                 # [cells, L, r]; xs rows already times their slot's scale
    d = bmm(h, B view [cells, r, out])            # [cells, L, out]
    y[token of each real row] += d                # pad rows zeroed; straight into y (baddbmm_) when the
                                                  # tokens are the rows in order

``xs`` is the step's active token rows in block order (one ``index_select``), multiplied by each row's slot scale
before the shrink (fp32: the small ops all run before the bmm stream, see below; half types scale ``h`` in fp32
and round it once, as the Triton kernel does). A cell inside a block that holds no token of this step (a free
cell, or a resident delta without tokens now), and a padded row of a cell with fewer than L tokens, are computed
and dropped: they never reach ``y``. Such a cell's rows are *read* (unlike the other plans, which read only
active runs), so they may hold anything, NaN included, with no effect on the result.

Cost model, in weight rows read: a block costs ``BLOCK_ROWS + cells * (r + TOKEN_ROWS * L)``; a member joins the
current block (its start on the block's lattice, the gcd of the gaps) when the merged block costs no more than
the two apart. So a hot slot with many tokens gets a block of its own instead of padding every cell to its
count, and a fragmented region is cut where the holes cost more than a block. The blocks depend only on the
layout relative to each rank's first start and on the per-slot token counts, so they are built once per token
layout, shared by every layer with that layout and kept for the next steps with the same tokens (decode steps
repeat their batch: ``_layout_cache``), and so are the views of the scratch buffers (``_scratch``); the cell views
are kept per pages object (``_cells``).

Why so few small ops: on this 2-core machine a small torch op costs ~20 us, and ~55 us right after a bmm that
streamed 2 MB of cells (the dispatcher's code and data left the 1.25 MB L2; ~130 us after a 16 MB read). A
LoRA call is therefore: the scale and x rows gathered (and scaled), the shrink bmm of every block, the expand
bmm of every block, one add back; two bmm and two dict lookups a block.
"""
from __future__ import annotations

import math
import weakref

import torch

from ..meta import DeltaKernelMeta
from .tensors import WS, add_rows, apply_act, f32

BLOCK_ROWS = 24
"""A block's fixed cost in weight rows: its two bmm calls cost ~9 us of dispatch on an idle core, the time to read
~24 rows of 2048 fp32 (q_proj's A and B rows) at ~20 GB/s. With rank 16 one free cell between two members costs
16 rows + its padding, less than a new block, so it is computed and dropped; two free cells are not. Measured on
the seven projections of the CPU benchmark model, 32 of 97 cells active (bench_kernels' regions layout), loaded
machine: 12 -> 15 blocks 5.1-6.0 ms, 24 -> 10 blocks 5.6-6.1, 48 -> 8 blocks 6.6-7.5, 96 -> 5 blocks 8.3-8.5:
a free cell read costs about what a block does, so larger values only add bytes."""

TOKEN_ROWS = 4
"""A padded token row's cost in weight rows: measured, rank 16, 1024 -> 1024, 32 cells, bmm pair 198 us at one
token a cell, 270 at 4 and 359 at 8, i.e. ~0.7 us a token row against ~0.2 us a weight row (its x row gathered,
its d row written and added back cost more than the bmm's share). Zipf popularity, 32 tokens on 8 slots: 2 ->
0.49 ms (50 padded rows), 4 -> 0.43 (36 rows), 8 -> 0.42, 16 -> 0.46 (33 rows, 4 blocks)."""


SHRINK_ROWS = 12
"""Token rows per shrink bmm. MKL's batched sgemm takes another path from 16 rows of x against a transposed A on
this CPU: 8 cells of rank 16, 1024 in: 49 us at 12 rows, 66 at 15, 273 at 16, 293 at 24 (rank 64, 2816 in: 750,
1149, 2507 us), so a block with more rows a cell runs its shrink on slices of at most 12 (a slice of 8 rows of a
32-row block: 41 us). The expand has no such step (27 us at 16 rows against 25 at 12)."""

SHRINK_SLICED_MAX = 64
"""...up to this many rows a cell; longer cells (a prefill chunk in a decode batch) amortise the other path
(1 cell, 1024 in, rank 16: 98 us at 128 rows in one call against ~88 us in slices of 12, each slice a call)."""


class _Block:
    """One bmm pair: ``cells`` cells ``stride`` rows apart from the start of slot ``head``, ``tokens`` rows a cell,
    padded rows ``pos`` .. ``pos + cells * tokens`` of the plan; ``hoff`` its first element in its rank's ``h``."""

    __slots__ = ("head", "stride", "cells", "tokens", "pos", "hoff")

    def __init__(self, head: int, stride: int, cells: int, tokens: int, pos: int, hoff: int):
        self.head, self.stride, self.cells, self.tokens, self.pos, self.hoff = head, stride, cells, tokens, pos, hoff


class _Rank:
    """The blocks of one rank (or width) ``size``: padded rows ``pos`` .. ``pos + rows`` of the plan, ``h`` elements
    ``hpos`` .. ``hpos + rows * size`` (one [rows, size] matrix), ``members`` its slots."""

    __slots__ = ("size", "blocks", "pos", "rows", "hpos", "members")

    def __init__(self, size: int, blocks: list[_Block], pos: int, rows: int, hpos: int, members: list[int]):
        self.size, self.blocks, self.pos, self.rows, self.hpos, self.members = size, blocks, pos, rows, hpos, members


class _Plan:
    """A step's blocks for one layout: padded rows in rank, block, cell, token order."""

    __slots__ = ("ranks", "rows", "hrows", "src", "slots", "real", "tok", "pads", "blocks", "views")

    def __init__(self, ranks: list[_Rank], rows: int, hrows: int, src: torch.Tensor | None, slots: torch.Tensor,
                 real: torch.Tensor | None, tok: torch.Tensor | None, pads: torch.Tensor | None):
        self.ranks = ranks
        self.rows = rows  # padded token rows P
        self.hrows = hrows  # elements of h: sum of rows * size over the ranks
        self.src = src  # int64 [P] token of each padded row (a pad repeats a real token); None: x itself, in order
        self.slots = slots  # int64 [P] slot of each padded row (a pad: its block's first member)
        self.real = real  # int64 [n] padded rows that hold a real token; None: all of them
        self.tok = tok  # int64 [n] token of each real row; None: token i is row i (every token, in order)
        self.pads = pads  # int64 [P - n] padded rows that hold no token; None: none
        self.blocks = [(rk.size, blk) for rk in ranks for blk in rk.blocks]  # (rank, block) in row order
        self.views: dict = {}  # views of this thread's scratch buffers, by buffer (``_scratch``)


_PLANS: "weakref.WeakKeyDictionary[DeltaKernelMeta, dict]" = weakref.WeakKeyDictionary()
_LAYOUTS: dict[tuple, dict] = {}  # (device, inference mode, T, runs) -> that token layout's plans, across steps
MAX_LAYOUTS = 32
"""Token layouts whose plans are kept across steps (oldest dropped first). Decode steps repeat their batch's layout
until a sequence joins or leaves, and a plan is a function of the layout and the pages' host tables only: built per
step it cost 7 builds (~1.5 ms) of each 108 ms decode step of the served mix (32 deltas, CPU benchmark model)."""


def _layout_cache(meta: DeltaKernelMeta) -> dict:
    """The plans of ``meta``'s token layout: this step's meta first, then an earlier step's with the same runs."""
    cache = _PLANS.get(meta)
    if cache is None:
        key = (meta.token_slots.device, torch.is_inference_mode_enabled(), meta.num_tokens, tuple(meta.runs_host))
        cache = _LAYOUTS.get(key)
        if cache is None:
            if len(_LAYOUTS) >= MAX_LAYOUTS:
                del _LAYOUTS[next(iter(_LAYOUTS))]
            cache = _LAYOUTS[key] = {}
        _PLANS[meta] = cache
    return cache


def plan(meta: DeltaKernelMeta, sizes: dict[int, int], starts: dict[int, int], work: list[int]) -> _Plan:
    """The blocks of ``meta`` for per-slot ``sizes`` (rank or width) and run ``starts`` (host dicts over the active
    slots) restricted to ``work`` (active slots with size > 0); cached per token layout (``_layout_cache``), first
    by the absolute layout (the wrapped projections of a model usually place the step's deltas at the same rows:
    one lookup), then by the layout relative to each rank's first start (layers whose regions start elsewhere)."""
    cache = _layout_cache(meta)
    fast = ("at", tuple(work), tuple([sizes[s] for s in work]), tuple([starts[s] for s in work]))
    hit = cache.get(fast)
    if hit is None:
        by_size: dict[int, list[int]] = {}
        for s in work:
            by_size.setdefault(sizes[s], []).append(s)
        key = []
        for r in sorted(by_size):
            group = by_size[r]
            base = min(starts[s] for s in group)
            key.append((r, tuple(sorted((starts[s] - base, s) for s in group))))
        key = tuple(key)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = _build(meta, key)
        cache[fast] = hit
    return hit


def _cost(cells: int, tokens: int, size: int) -> int:
    return BLOCK_ROWS + cells * (size + TOKEN_ROWS * tokens)


def _blocks(members: tuple[tuple[int, int], ...], counts: dict[int, int], size: int):
    """(stride, [(cell, slot)], tokens) per block for ``members`` = (start, slot) in start order: a member joins the
    current block when the merged block costs no more than the two apart (``_cost``)."""
    (first, s0), rest = members[0], members[1:]
    cur, stride, tokens = [(0, s0)], 0, counts[s0]
    for a, s in rest:
        gap = a - first
        if gap > 0:
            g = math.gcd(stride, gap)
            t = max(tokens, counts[s])
            if _cost(gap // g + 1, t, size) <= _cost(cur[-1][0] + 1, tokens, size) + _cost(1, counts[s], size):
                k = stride // g if stride else 1
                cur = [(c * k, m) for c, m in cur] + [(gap // g, s)]
                stride, tokens = g, t
                continue
        yield stride or size, cur, tokens
        cur, stride, tokens, first = [(0, s)], 0, counts[s], a
    yield stride or size, cur, tokens


def _build(meta: DeltaKernelMeta, key) -> _Plan:
    dev = meta.token_slots.device
    seg = {s: k for k, s in enumerate(meta.active_slots_host)}
    sh = meta.seg_start_host
    sorted_ids = meta.sorted_active_ids.tolist()
    tokens_of = {s: sorted_ids[sh[seg[s]]:sh[seg[s] + 1]] for _, group in key for _, s in group}
    counts = {s: len(t) for s, t in tokens_of.items()}
    src: list[int] = []  # token of each padded row
    slot_of: list[int] = []
    real: list[int] = []
    ranks: list[_Rank] = []
    hpos = 0
    for size, group in key:
        rank_pos = len(src)
        blocks = []
        for stride, cells, tokens in _blocks(group, counts, size):
            head, n_cells = cells[0][1], cells[-1][0] + 1
            blocks.append(_Block(head, stride, n_cells, tokens, len(src), (len(src) - rank_pos) * size))
            at = dict(cells)
            for c in range(n_cells):
                s = at.get(c)
                ids = tokens_of[s] if s is not None else ()
                for j in range(tokens):
                    if j < len(ids):
                        real.append(len(src))
                        src.append(ids[j])
                    else:
                        src.append(tokens_of[head][0])  # a pad repeats a real token's row: finite
                    slot_of.append(head if s is None else s)
        rows = len(src) - rank_pos
        ranks.append(_Rank(size, blocks, rank_pos, rows, hpos, [s for _, s in group]))
        hpos += rows * size
    n_rows = len(src)
    in_order = n_rows == len(real) == meta.num_tokens and src == list(range(n_rows))
    src_t = None if in_order else torch.tensor(src, dtype=torch.int64, device=dev)
    real_t = None if len(real) == n_rows else torch.tensor(real, dtype=torch.int64, device=dev)
    tok_t = None if in_order else (src_t if real_t is None else
                                   torch.tensor([src[p] for p in real], dtype=torch.int64, device=dev))
    is_real = set(real)
    pads_t = None if real_t is None else torch.tensor([q for q in range(n_rows) if q not in is_real],
                                                      dtype=torch.int64, device=dev)
    return _Plan(ranks, n_rows, hpos, src_t, torch.tensor(slot_of, dtype=torch.int64, device=dev), real_t, tok_t,
                 pads_t)


# ------------------------------------------------------------------------------------------- views
_VIEWS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
MAX_VIEWS = 1024
"""Cell views kept per pages object (a few per block: a step's blocks recur while its batch does); past it the
dict starts over."""


def _cells(pages, name: str, rows: torch.Tensor, first: int, blk: _Block, size: int, transposed: bool) -> torch.Tensor:
    """[cells, size, K] cells of ``rows`` [N, K] (unit last stride) ``blk.stride`` rows apart from row ``first``, or
    their transposes [cells, K, size]: strided, no copy; kept per pages object (its row tensors never change)."""
    views = _VIEWS.get(pages)
    if views is None:
        views = _VIEWS[pages] = {}
    key = (name, first, blk.stride, blk.cells, size)
    v = views.get(key)
    if v is None:
        if len(views) >= MAX_VIEWS:
            views.clear()
        rs = rows.stride(0)
        off = rows.storage_offset() + first * rs
        if transposed:
            v = rows.as_strided((blk.cells, rows.shape[1], size), (blk.stride * rs, 1, rs), off)
        else:
            v = rows.as_strided((blk.cells, size, rows.shape[1]), (blk.stride * rs, rs, 1), off)
        views[key] = v
    return v


def _bias_cells(pages, first: int, blk: _Block, size: int) -> torch.Tensor:
    """[cells, 1, size] view of the per-row ``pages.down_bias`` [N] (any stride) over the block's cells."""
    views = _VIEWS.get(pages)
    if views is None:
        views = _VIEWS[pages] = {}
    key = ("down_bias", first, blk.stride, blk.cells, size)
    v = views.get(key)
    if v is None:
        if len(views) >= MAX_VIEWS:
            views.clear()
        t = pages.down_bias
        bs = t.stride(0)
        v = views[key] = t.as_strided((blk.cells, 1, size), (blk.stride * bs, 0, bs), t.storage_offset() + first * bs)
    return v


def _rows3(buf: torch.Tensor, lo: int, blk: _Block, width: int) -> torch.Tensor:
    """[cells, tokens, width] view of the contiguous ``buf`` from element ``lo``."""
    return buf.as_strided((blk.cells, blk.tokens, width), (blk.tokens * width, width, 1), buf.storage_offset() + lo)


def _shrink(xb: torch.Tensor, a: torch.Tensor, hb: torch.Tensor, tokens: int, bias: torch.Tensor | None = None) -> None:
    """hb [cells, L, r] = xb [cells, L, k] @ a [cells, k, r] (+ ``bias`` [cells, 1, r]), in slices of SHRINK_ROWS
    token rows (see there)."""
    if tokens <= SHRINK_ROWS or tokens > SHRINK_SLICED_MAX:
        steps = ((slice(None), xb, hb),)
    else:
        steps = ((j, xb[:, j:j + SHRINK_ROWS], hb[:, j:j + SHRINK_ROWS]) for j in range(0, tokens, SHRINK_ROWS))
    for _, xj, hj in steps:
        if bias is None:
            torch.bmm(xj, a, out=hj)
        else:
            torch.baddbmm(bias, xj, a, out=hj)


def _token_rows(x: torch.Tensor, p: _Plan, name: str) -> torch.Tensor:
    """[P, K] padded token rows: x itself when the plan's rows are every token in order, else a gather into a
    reused buffer."""
    if p.src is None:
        return x.contiguous()
    xs = WS.get(name, (p.rows, x.shape[1]), x.dtype, x.device)
    return torch.index_select(x, 0, p.src, out=xs)


def _add_back(y: torch.Tensor, d: torch.Tensor, p: _Plan) -> None:
    """y[token of each real row] += d [P, out] (scratch). With y's dtype, the pads are zeroed and added to the token
    their row repeats (an index_fill_ of the few pad rows, not an index_select of every real one: pad rows may hold
    NaN from a free cell, never added); else the real rows are picked first (``add_rows`` rounds each row once)."""
    if p.pads is None:
        add_rows(y, p.tok, d)
    elif d.dtype == y.dtype:
        add_rows(y, p.src, d.index_fill_(0, p.pads, 0))
    else:
        add_rows(y, p.tok, d.index_select(0, p.real))


def _scratch(p: _Plan, name: str, width: int, dtype: torch.dtype, device: torch.device):
    """(the [rows, width] matrix, its per-block [cells, L, width] views) of a reused buffer (``tensors.WS``) for
    the plan's padded rows; ``width`` 0: the h buffer, each rank's rows ``size`` wide. The views are kept on the
    plan by the buffer's address, so the layers of a step build them once: each view costs ~1 us to make, ~5 us
    on a loaded machine, against a bmm of ~5 us (``BLOCK_ROWS``). A kept view holds its buffer, so a regrown
    buffer never shares an address with one still viewed."""
    numel = p.hrows if width == 0 else p.rows * width
    inference = torch.is_inference_mode_enabled()
    base = WS.buffers.get((name, device, dtype))
    if base is None or base.numel() < max(numel, 1) or (base.is_inference() and not inference):
        WS.get(name, (numel,), dtype, device)
        base = WS.buffers[(name, device, dtype)]
    key = (name, base.data_ptr(), width, inference)  # views made in inference mode are not written outside it
    hit = p.views.get(key)
    if hit is None:
        blocks = []
        for rk in p.ranks:
            for blk in rk.blocks:
                if width == 0:
                    blocks.append(_rows3(base, rk.hpos + blk.hoff, blk, rk.size))
                else:
                    blocks.append(_rows3(base, blk.pos * width, blk, width))
        mat = [base[rk.hpos:rk.hpos + rk.rows * rk.size].view(rk.rows, rk.size) for rk in p.ranks] if width == 0 \
            else base[:numel].view(p.rows, width)
        hit = p.views[key] = (mat, blocks)
    return hit


def _block_views(p: _Plan, t: torch.Tensor) -> list[torch.Tensor]:
    """Per-block [cells, L, width] views of the contiguous [P, width] ``t`` (x or y itself: not kept)."""
    return [_rows3(t, blk.pos * t.shape[1], blk, t.shape[1]) for rk in p.ranks for blk in rk.blocks]


# ------------------------------------------------------------------------------------------- the ops
def strided_lora(y: torch.Tensor, x: torch.Tensor, pages, ranks: dict[int, int], starts: dict[int, int],
                 work: list[int], meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (x[t] @ A_s.T) @ B_s.T for the tokens of ``work`` slots (active, rank > 0; ``ranks`` and
    ``starts`` the host values of the pages' tables). Shapes as ``kernels.add_lora``."""
    p = plan(meta, ranks, starts, work)
    dt, dev = pages.a_rows.dtype, y.device
    sc, _ = _scratch(p, "st_s", 1, torch.float32, dev)  # [P, 1] fp32: each row's slot scale
    torch.index_select(pages.scale, 0, p.slots, out=sc.view(-1))
    prescale = dt == torch.float32  # scale x's rows before the shrink (below)
    if p.src is None and not prescale:
        xv = _block_views(p, x.contiguous())
    else:
        xs, xv = _scratch(p, "st_x", x.shape[1], x.dtype, dev)  # [P, in]
        if p.src is None:
            torch.mul(x, sc, out=xs)
        else:
            torch.index_select(x, 0, p.src, out=xs)
            if prescale:
                xs.mul_(sc)
    hs, hv = _scratch(p, "st_h", 0, dt, dev)  # per rank [rows, r]
    blocks = p.blocks
    for (r, blk), xb, hb in zip(blocks, xv, hv):
        _shrink(xb, _cells(pages, "a", pages.a_rows, starts[blk.head], blk, r, True), hb, blk.tokens)
    if not prescale:  # half types: h scaled in fp32 and rounded once, as the Triton kernel does
        for rk, h in zip(p.ranks, hs):
            h.mul_(sc[rk.pos:rk.pos + rk.rows])
    direct = p.tok is None and y.dtype == torch.float32 and y.is_contiguous()  # rows are the tokens: add into y
    if direct:
        dv = _block_views(p, y)
    else:
        d, dv = _scratch(p, "st_d", y.shape[1], dt, dev)  # [P, out]
    for (r, blk), hb, db in zip(blocks, hv, dv):
        b = _cells(pages, "b", pages.b_rows, starts[blk.head], blk, r, False)
        if direct:
            db.baddbmm_(hb, b)
        else:
            torch.bmm(hb, b, out=db)
    if not direct:
        _add_back(y, d, p)


def strided_bottleneck(y: torch.Tensor, u: torch.Tensor, pages, widths: dict[int, int], starts: dict[int, int],
                       acts: dict[int, int], work: list[int], meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s) for the tokens of ``work`` slots (active,
    width > 0). ``u`` may be ``y``: the token rows are gathered (or, all in order, copied) before anything is
    added. The down bias is read as strided cell views too (added by the shrink's baddbmm), the up bias rows are
    gathered as the expand's input."""
    p = plan(meta, widths, starts, work)
    hid, dt, dev = u.shape[1], pages.up_rows.dtype, y.device
    if p.src is None:
        us = u.contiguous()
        if us.data_ptr() == y.data_ptr():
            us = WS.get("st_u", us.shape, us.dtype, dev).copy_(us)  # y is written below
        uv = _block_views(p, us)
    else:
        us, uv = _scratch(p, "st_u", hid, u.dtype, dev)  # [P, h]
        torch.index_select(u, 0, p.src, out=us)
    hs, hv = _scratch(p, "st_h", 0, dt, dev)  # per width [rows, m]
    for (m, blk), ub, hb in zip(p.blocks, uv, hv):
        first = starts[blk.head]
        _shrink(ub, _cells(pages, "down", pages.down_rows, first, blk, m, True), hb, blk.tokens,
                _bias_cells(pages, first, blk, m))
    hps, hpv = _scratch(p, "st_hp", 0, dt, dev)  # per width [rows, m]: act(h) for the up bmm
    for rk, h, hp in zip(p.ranks, hs, hps):
        codes = sorted({acts[s] for s in rk.members})
        tok_act = pages.act.index_select(0, p.slots[rk.pos:rk.pos + rk.rows]) if len(codes) > 1 else None
        hp.copy_(apply_act(f32(h), codes, tok_act))  # activations in fp32
    d, dv = _scratch(p, "st_d", hid, dt, dev)  # [P, h]: starts as each row's up bias
    torch.index_select(pages.up_bias_rows, 0, pages.up_bias_row.index_select(0, p.slots), out=d)
    for (m, blk), hb, db in zip(p.blocks, hpv, dv):
        db.baddbmm_(hb, _cells(pages, "up", pages.up_rows, starts[blk.head], blk, m, False))
    sc, _ = _scratch(p, "st_s", 1, torch.float32, dev)  # [P, 1] fp32
    torch.index_select(pages.scale, 0, p.slots, out=sc.view(-1))
    _add_back(y, f32(d).mul_(sc), p)  # fp32 d: scaled in place (scratch)
