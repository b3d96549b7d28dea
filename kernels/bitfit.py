"""BitFit (bias deltas) in Triton: a gathered add, ``y[t] += bias[slot[t]]``.

One program per (token tile, column tile) loads each token's slot and the matching bias row by
``slot * stride`` (no pointer tables, no sort needed); tokens with slot -1 are masked out and never
written. The same row-wise kernel, with ``MULTIPLY``, scales rows for (IA)³ (``ia3.py``). It reads
``y`` and ``bias`` once: memory-bound, ~2 bytes of traffic per byte of ``y``.
"""
from __future__ import annotations

import torch

from ._checks import check_rows_op
from ._triton import INTERPRET, next_pow2, require_triton, tl, triton
from .meta import DeltaKernelMeta


@triton.jit
def _rowwise_kernel(y_ptr, v_ptr, slots_ptr, T, N, stride_yt, stride_vs,
                    MULTIPLY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[t, n] = y[t, n] (+ or *) v[slot[t], n] for slot[t] >= 0, computed in fp32."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + offs_t, mask=offs_t < T, other=-1)  # [BLOCK_T]
    mask = (slot >= 0)[:, None] & (offs_n < N)[None, :]
    v = tl.load(v_ptr + slot.to(tl.int64)[:, None] * stride_vs + offs_n[None, :], mask=mask, other=0.0)
    y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    if MULTIPLY:
        y = y * v.to(tl.float32)
    else:
        y = y + v.to(tl.float32)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


_ROWWISE_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w)
                    for bt, bn, w in ((2, 1024, 4), (4, 512, 4), (16, 256, 4), (32, 128, 4))]
_rowwise_tuned = triton.autotune(_ROWWISE_CONFIGS, key=["N", "MULTIPLY"], restore_value=["y_ptr"])(_rowwise_kernel)


def launch_rowwise(y: torch.Tensor, v: torch.Tensor, meta: DeltaKernelMeta, multiply: bool) -> None:
    num_tokens, n = y.shape
    args = (y, v, meta.token_slots, num_tokens, n, y.stride(0), v.stride(0))
    if y.is_cuda and not INTERPRET:
        grid = lambda META: (triton.cdiv(num_tokens, META["BLOCK_T"]), triton.cdiv(n, META["BLOCK_N"]))  # noqa: E731
        _rowwise_tuned[grid](*args, MULTIPLY=multiply)
    else:
        bt, bn = min(64, next_pow2(num_tokens)), min(256, next_pow2(n))
        _rowwise_kernel[(triton.cdiv(num_tokens, bt), triton.cdiv(n, bn))](*args, MULTIPLY=multiply, BLOCK_T=bt,
                                                                            BLOCK_N=bn)


def add_bias(y: torch.Tensor, bias: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """Semantics: y[t] += bias[slot[t]] for slot[t] >= 0.   y [T, out] (in place), bias [S, out]."""
    check_rows_op("add_bias", "y", y, "bias", bias, meta)
    launch_bias(y, bias, meta)


def launch_bias(y, bias, meta) -> None:
    """add_bias without the argument checks (the dispatcher has done them)."""
    require_triton(y, "add_bias")
    if not meta.no_delta:
        launch_rowwise(y, bias, meta, multiply=False)
