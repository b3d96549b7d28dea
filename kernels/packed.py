"""Packed LoRA in Triton: one shrink launch over every slot's stack of A rows for all the siblings reading the
same input (``kernels.PackedLoraPages``), then one expand launch per member reading its columns of ``h``.

The shrink is ``lora.shrink`` itself, on the stacks (rows ``start[s] .. start[s] + rank[s]``, rank the sum of
the members' ranks), so q/k/v cost one shrink launch instead of three and read ``x`` once. The expand is
``lora.py``'s expand kernel with one change: member m's columns of slot s's row of ``h`` start at
``o = start_m[s] - start[s]`` (its first row minus the stack's), read from the two int32 tables, so it needs no
table of its own. Grid as ``lora.py``: (M tiles of the longest segment, active slots, output tiles); programs
of slots whose member rank is 0 exit at once, and the K loop stops at the member's own rank (D3).
"""
from __future__ import annotations

import torch

from ._triton import INTERPRET, block, next_pow2, require_triton, tl, triton
from .lora import RANK_TILE, shrink
from .meta import DeltaKernelMeta
from .pages import PackedLoraPages


@triton.jit
def _expand_offset_kernel(h_ptr, w_ptr, y_ptr, scale_ptr, start_ptr, rank_ptr, stack_ptr, sorted_ptr, active_ptr,
                          seg_start_ptr, N, stride_ht, stride_wr, stride_yt, M_HINT,
                          CAST_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """y[tok, n] += scale[slot] * h[seg0 + m, o : o + rank] @ w[row0 : row0 + rank, n], o = row0 - stack[slot]."""
    pid_m = tl.program_id(0)
    pid_a = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(active_ptr + pid_a)
    rank = tl.load(rank_ptr + slot)
    seg0 = tl.load(seg_start_ptr + pid_a)
    seg_len = tl.load(seg_start_ptr + pid_a + 1) - seg0
    m0 = pid_m * BLOCK_M
    if (rank > 0) & (m0 < seg_len):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        row0 = tl.load(start_ptr + slot).to(tl.int64)
        col0 = row0 - tl.load(stack_ptr + slot).to(tl.int64)  # the member's first column of h
        h_rows = h_ptr + (seg0 + offs_m).to(tl.int64)[:, None] * stride_ht + col0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, rank, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < rank
            ht = tl.load(h_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK] fp32
            wt = tl.load(w_ptr + (row0 + kk)[:, None] * stride_wr + offs_n[None, :],
                         mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
            if CAST_FP32:
                acc = tl.dot(ht, wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(ht.to(wt.dtype), wt, acc)
        acc = acc * tl.load(scale_ptr + slot)
        tok = tl.load(sorted_ptr + seg0 + offs_m, mask=mask_m, other=0).to(tl.int64)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


_EXPAND_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": RANK_TILE}, num_warps=w, num_stages=2)
                   for bm, bn, w in ((16, 64, 4), (16, 128, 4), (32, 128, 4), (64, 128, 8), (64, 64, 4))]
_expand_tuned = triton.autotune(_EXPAND_CONFIGS, key=["N", "M_HINT", "CAST_FP32"],
                                restore_value=["y_ptr"])(_expand_offset_kernel)


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
    if meta.no_delta or pages.max_rank == 0:
        return TritonLoraShrink(pages, meta, None)
    return TritonLoraShrink(pages, meta, shrink(x, pages.a_rows, pages.start, pages.rank, pages.max_rank, meta))


def triton_expand_lora(y: torch.Tensor, sh: TritonLoraShrink, member: int) -> None:
    """y[tok_p] += scale_m[s] * h[p, o : o + rank_m[s]] @ b_rows_m[start_m[s] : start_m[s] + rank_m[s]], in place;
    tiles never below the tl.dot minimum (BLOCK_K = RANK_TILE = 16, BLOCK_M / BLOCK_N >= 16 via ``block``)."""
    require_triton(y, "shrink_lora")
    mp, meta, h = sh.pages.members[member], sh.meta, sh.h
    if h is None or mp.max_rank == 0:
        return
    n_out = y.shape[1]
    cast = INTERPRET or y.dtype == torch.float32
    m_hint = next_pow2(max(meta.max_seg_len, 1))
    args = (h, mp.b_rows, y, mp.scale, mp.start, mp.rank, sh.pages.start, meta.sorted_token_ids, meta.active_slots,
            meta.seg_start, n_out, h.stride(0), mp.b_rows.stride(0), y.stride(0), m_hint)
    if y.is_cuda and not INTERPRET:
        grid = lambda META: (triton.cdiv(meta.max_seg_len, META["BLOCK_M"]), meta.num_active,  # noqa: E731
                             triton.cdiv(n_out, META["BLOCK_N"]))
        _expand_tuned[grid](*args, CAST_FP32=cast)
    else:  # interpreter: few, large programs
        bm, bn = block(meta.max_seg_len, 64), block(n_out, 128)
        grid = (triton.cdiv(meta.max_seg_len, bm), meta.num_active, triton.cdiv(n_out, bn))
        _expand_offset_kernel[grid](*args, CAST_FP32=cast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=RANK_TILE)
