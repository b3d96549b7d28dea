"""Row ops in Triton: BitFit's gathered add ``y[t] += bias[slot[t]]`` and (IA)3's gathered scale
``t[i] *= vec[slot[i]]``, one kernel with a ``MULTIPLY`` switch.

(IA)3 as PEFT applies it scales the *output* of the k and v projections (``y = base(x) * l``, the base
bias scaled too) and the *input* of the feed-forward down projection (``y = base(x * l)``); both are
``mul_rows`` on a different tensor (the base output after the matmul, or the input before it), so the
wrapped layer decides which (``server/deltas/linear.py``).

One program per (token tile, column tile) loads each token's slot, the slot's row index ``row[slot]``
(``kernels.RowPages``) and that row (an index, no pointer tables, no sort needed); tokens with slot -1 are masked out and never
written. It reads the activations and the rows once: memory-bound, ~2 bytes of traffic per byte of
``y``. The sum or product is taken in fp32 and rounded once, so for fp16/bf16 inputs it is the
correctly rounded result (what the exact reference gives, rounded to the dtype).
"""
from __future__ import annotations

import torch

from ._triton import INTERPRET, next_pow2, require_triton, tl, triton
from .meta import DeltaKernelMeta
from .pages import RowPages


@triton.jit
def _rows_kernel(y_ptr, v_ptr, row_ptr, slots_ptr, T, N, stride_yt, stride_vr,
                 MULTIPLY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[t, n] = y[t, n] (+ or *) v[row[slot[t]], n] for slot[t] >= 0, computed in fp32."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + offs_t, mask=offs_t < T, other=-1)  # [BLOCK_T]
    has = slot >= 0
    row = tl.load(row_ptr + slot, mask=has, other=0).to(tl.int64)  # [BLOCK_T] row of each token's slot
    mask = has[:, None] & (offs_n < N)[None, :]
    v = tl.load(v_ptr + row[:, None] * stride_vr + offs_n[None, :], mask=mask, other=0.0)
    y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    if MULTIPLY:
        y = y * v.to(tl.float32)
    else:
        y = y + v.to(tl.float32)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


_ROWS_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w)
                 for bt, bn, w in ((2, 1024, 4), (4, 512, 4), (16, 256, 4), (32, 128, 4))]
_rows_tuned = triton.autotune(_ROWS_CONFIGS, key=["N", "MULTIPLY"], restore_value=["y_ptr"])(_rows_kernel)


def _launch_rows(y: torch.Tensor, pages: RowPages, meta: DeltaKernelMeta, multiply: bool) -> None:
    num_tokens, n = y.shape
    args = (y, pages.rows, pages.row, meta.token_slots, num_tokens, n, y.stride(0), pages.rows.stride(0))
    if y.is_cuda and not INTERPRET:
        grid = lambda META: (triton.cdiv(num_tokens, META["BLOCK_T"]), triton.cdiv(n, META["BLOCK_N"]))  # noqa: E731
        _rows_tuned[grid](*args, MULTIPLY=multiply)
    else:  # interpreter: few, large programs
        bt, bn = min(64, next_pow2(num_tokens)), min(256, next_pow2(n))
        _rows_kernel[(triton.cdiv(num_tokens, bt), triton.cdiv(n, bn))](*args, MULTIPLY=multiply, BLOCK_T=bt,
                                                                         BLOCK_N=bn)


def triton_add_bias(y: torch.Tensor, pages: RowPages, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.add_bias`` (which checks the arguments): y[t] += rows[row[slot[t]]]."""
    require_triton(y, "add_bias")
    if not meta.skippable:
        _launch_rows(y, pages, meta, multiply=False)


def triton_mul_rows(t: torch.Tensor, pages: RowPages, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.mul_rows`` (which checks the arguments): t[i] *= rows[row[slot[i]]]."""
    require_triton(t, "mul_rows")
    if not meta.skippable:
        _launch_rows(t, pages, meta, multiply=True)
