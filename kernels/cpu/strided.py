"""The strided plan of the CPU backend: ``torch.bmm`` straight on strided views of the pages' cells, tokens padded
per cell, nothing gathered but the token rows.

At decode a cell (one slot's run of rows) holds one or a few tokens, and the work is reading its rows once.
``F.grouped_mm`` on the CPU walks its groups in C++ with a slice, an ``item()`` and a full ``mm`` dispatch per
group (~7 us a group); ``torch.bmm`` hands the whole batch to MKL's batched GEMM (~3.2 us a cell of 16 x 1024
fp32, which is reading 64 KB at ~20 GB/s, this core's L3 read rate). Measured, 1 thread, rank 16,
1024 -> 1024, 32 cells of one token: shrink + expand 200 us with bmm against 470 us with grouped_mm; with 8
tokens a cell 360 against 830.

Blocks (``blocks.py``: evenly spaced cells of one true rank, D3, cut by a cost model and cached per token layout).
One block is one bmm pair::

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

Why so few small ops: on this 2-core machine a small torch op costs ~20 us, and ~55 us right after a bmm that
streamed 2 MB of cells (the dispatcher's code and data left the 1.25 MB L2; ~130 us after a 16 MB read). A
LoRA call is therefore: the scale and x rows gathered (and scaled), the shrink bmm of every block, the expand
bmm of every block, one add back; two bmm and two dict lookups a block.
"""
from __future__ import annotations

import weakref

import torch

from ..meta import DeltaKernelMeta
from .blocks import Block, Plan, plan
from .tensors import WS, add_rows, apply_act, f32

SHRINK_ROWS = 12
"""Token rows per shrink bmm. MKL's batched sgemm takes another path from 16 rows of x against a transposed A on
this CPU: 8 cells of rank 16, 1024 in: 49 us at 12 rows, 66 at 15, 273 at 16, 293 at 24 (rank 64, 2816 in: 750,
1149, 2507 us), so a block with more rows a cell runs its shrink on slices of at most 12 (a slice of 8 rows of a
32-row block: 41 us). The expand has no such step (27 us at 16 rows against 25 at 12)."""

SHRINK_SLICED_MAX = 64
"""...up to this many rows a cell; longer cells (a prefill chunk in a decode batch) amortise the other path
(1 cell, 1024 in, rank 16: 98 us at 128 rows in one call against ~88 us in slices of 12, each slice a call)."""


# ------------------------------------------------------------------------------------------- views
_VIEWS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
MAX_VIEWS = 1024
"""Cell views kept per pages object (a few per block: a step's blocks recur while its batch does); past it the
dict starts over."""


def _cells(pages, name: str, rows: torch.Tensor, first: int, blk: Block, size: int, transposed: bool) -> torch.Tensor:
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


def _bias_cells(pages, first: int, blk: Block, size: int) -> torch.Tensor:
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


def _rows3(buf: torch.Tensor, lo: int, blk: Block, width: int) -> torch.Tensor:
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



def _add_back(y: torch.Tensor, d: torch.Tensor, p: Plan) -> None:
    """y[token of each real row] += d [P, out] (scratch). With y's dtype, the pads are zeroed and added to the token
    their row repeats (an index_fill_ of the few pad rows, not an index_select of every real one: pad rows may hold
    NaN from a free cell, never added); else the real rows are picked first (``add_rows`` rounds each row once)."""
    if p.pads is None:
        add_rows(y, p.tok, d)
    elif d.dtype == y.dtype:
        add_rows(y, p.src, d.index_fill_(0, p.pads, 0))
    else:
        add_rows(y, p.tok, d.index_select(0, p.real))


def _scratch(p: Plan, name: str, width: int, dtype: torch.dtype, device: torch.device):
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


def _block_views(p: Plan, t: torch.Tensor) -> list[torch.Tensor]:
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
