"""Packed LoRA in Triton: one shrink launch over every slot's stack of A rows for all the siblings reading the
same input (``kernels.PackedLoraPages``), then one expand launch per member reading its columns of ``h``.

The shrink is ``lora.shrink`` itself, on the stacks (rows ``start[s] .. start[s] + rank[s]``, rank the sum of
the members' ranks), so q/k/v cost one shrink launch instead of three and read ``x`` once. The expand is
``lora.expand`` with its column origin (``h_col``): member m's columns of slot s's row of ``h`` start at
``o = start_m[s] - start[s]`` (its first row minus the stack's), read from the two int32 tables, so it needs no
table of its own; grids, capacity mode and tiles are ``lora.py``'s; programs of slots whose member rank is 0
exit at once, and the K loop stops at the member's own rank (D3).
"""
from __future__ import annotations

import torch

from ._triton import require_triton
from .lora import expand, shrink
from .meta import DeltaKernelMeta
from .pages import PackedLoraPages


class TritonLoraShrink:
    """The shrink of one call: ``h`` fp32 [N, R] in segment order (``lora.shrink``), columns past a slot's
    stack unwritten and never read."""

    __slots__ = ("pages", "meta", "h")

    def __init__(self, pages: PackedLoraPages, meta: DeltaKernelMeta, h: torch.Tensor | None):
        self.pages, self.meta, self.h = pages, meta, h

    def add_to(self, y: torch.Tensor, member: int) -> None:
        triton_expand_lora(y, self, member)


def triton_shrink_lora(x: torch.Tensor, pages: PackedLoraPages, meta: DeltaKernelMeta) -> TritonLoraShrink:
    """The Triton backend of ``kernels.shrink_lora`` (which checks the arguments): one launch for all members."""
    require_triton(x, "shrink_lora")
    if meta.skippable or pages.max_rank == 0:
        return TritonLoraShrink(pages, meta, None)
    return TritonLoraShrink(pages, meta, shrink(x, pages.a_rows, pages.start, pages.rank, pages.max_rank, meta))


def triton_expand_lora(y: torch.Tensor, sh: TritonLoraShrink, member: int) -> None:
    """y[tok_p] += scale_m[s] * h[p, o : o + rank_m[s]] @ b_rows_m[start_m[s] : start_m[s] + rank_m[s]], in place;
    tiles never below the tl.dot minimum (BLOCK_K = RANK_TILE = 16, BLOCK_M / BLOCK_N >= 16 via ``block``)."""
    require_triton(y, "shrink_lora")
    mp, meta, h = sh.pages.members[member], sh.meta, sh.h
    if h is None or mp.max_rank == 0:
        return
    expand(y, h, mp.b_rows, mp.start, mp.scale, mp.rank, meta, h_col=sh.pages.start)
