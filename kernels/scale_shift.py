"""DoRA's column scale in Triton: ``y[t] = y[t] * scale[s] + shift[s]`` for the tokens of flagged slots only.

DoRA (PEFT ``use_dora=True``) serves as ``y = g * (x W^T + s x A^T B^T) + b0`` with ``g = m / ||W + s B A||``
per output column (``delta_store/dora.py``). The wrapped layer has ``base(x) + lora(x)`` already, which
contains ``b0``, so one affine row op finishes it: ``y * g + (1 - g) * b0`` (``shift`` holds ``(1 - g) b0``,
zero where the base has no bias). A slot's g and shift are one row each of ``kernels.ScaleShiftPages``
(``row[s]``, an index into the layer's fp32 arena, D13). Only slots with ``flag[s] != 0`` are touched: the grid walks the step's
active slots (as the LoRA kernels do) and a program of an unflagged slot exits after one scalar load,
so plain-LoRA, other kinds' and base tokens in the same batch pay nothing for it and keep their values
bit for bit. Memory-bound: one read and one write of each DoRA token's row, computed in fp32 and
rounded once.
"""
from __future__ import annotations

import torch

from ._triton import INTERPRET, next_pow2, require_triton, tl, triton
from .lora import segment_args, _segment
from .meta import DeltaKernelMeta
from .pages import ScaleShiftPages


@triton.jit
def _scale_shift_kernel(y_ptr, scale_ptr, shift_ptr, row_ptr, flag_ptr, sorted_ptr, active_ptr, seg_start_ptr,
                        count_ptr, N, stride_yt, stride_ss, stride_bs, M_HINT, CAPACITY: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[tok, n] = y[tok, n] * scale[r, n] + shift[r, n], r = row[slot], for the tokens of slot = active[pid_a] if
    flagged."""
    pid_m = tl.program_id(0)
    pid_a = tl.program_id(1)
    slot, flag, seg0, seg_len = _segment(active_ptr, seg_start_ptr, flag_ptr, count_ptr, pid_a, CAPACITY)
    m0 = pid_m * BLOCK_M
    if (flag != 0) & (m0 < seg_len):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tok = tl.load(sorted_ptr + seg0 + offs_m, mask=mask_m, other=0).to(tl.int64)  # [BLOCK_M]
        r = tl.load(row_ptr + slot).to(tl.int64)
        g = tl.load(scale_ptr + r * stride_ss + offs_n, mask=mask_n, other=1.0).to(tl.float32)
        c = tl.load(shift_ptr + r * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        mask = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y * g[None, :] + c[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
            for bm, bn, w in ((1, 1024, 4), (4, 512, 4), (16, 256, 4), (32, 128, 4))]
_tuned = triton.autotune(_CONFIGS, key=["N", "M_HINT", "CAPACITY"], restore_value=["y_ptr"])(_scale_shift_kernel)


def triton_scale_shift_rows(y: torch.Tensor, pages: ScaleShiftPages, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.scale_shift_rows`` (which checks the arguments; semantics there)."""
    require_triton(y, "scale_shift_rows")
    if meta.skippable:
        return
    n = y.shape[1]
    m_ext, a_ext, m_hint, count = segment_args(meta)
    args = (y, pages.scale_rows, pages.shift_rows, pages.row, pages.flag, *meta.launch_index, count, n, y.stride(0),
            pages.scale_rows.stride(0), pages.shift_rows.stride(0), m_hint)
    if y.is_cuda and not INTERPRET:
        grid = lambda META: (triton.cdiv(m_ext, META["BLOCK_M"]), a_ext,  # noqa: E731
                             triton.cdiv(n, META["BLOCK_N"]))
        _tuned[grid](*args, CAPACITY=meta.capacity)
    else:  # interpreter: few, large programs
        bm, bn = min(64, next_pow2(m_ext)), min(256, next_pow2(n))
        grid = (triton.cdiv(m_ext, bm), a_ext, triton.cdiv(n, bn))
        _scale_shift_kernel[grid](*args, CAPACITY=meta.capacity, BLOCK_M=bm, BLOCK_N=bn)
