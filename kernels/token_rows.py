"""Trainable tokens in Triton: replacement embedding rows and the output-head logits of those ids.

PEFT's trainable tokens *replace* rows of the ``[vocab, hidden]`` embedding (``index_copy``); with tied
embeddings the output head uses the same rows (``delta_store/delta.py``, ``RowsTerm``). Paged (D13,
``kernels.TokenPages``): slot s's ``count[s]`` replaced ids are a run of ``ids`` from ``id_start[s]`` and
their rows a run of ``values`` from ``start[s]``, so a delta holds its own rows, not a ``max_token_rows`` slab.

* ``replace_rows``: one program per (token tile, column tile), as the BitFit row kernel: each token
  loads its slot and input id, compares the id with its slot's ``count`` ids, and overwrites its
  embedding row with the matching value row; other tokens are masked out and never written.
* ``head_rows``: the logits of a slot's replaced ids are ``h . V_s[j]``: the LoRA shrink kernel
  computes exactly ``h[tok] @ V_s.T`` (``count`` as its rank, ``start`` as its runs), and a scatter kernel
  writes them into ``logits[tok, I_s[j]]``; every other logit is the base head's.
"""
from __future__ import annotations

import torch

from ._triton import next_pow2, require_triton, tl, triton
from .lora import RANK_TILE, _segment, segment_args, shrink
from .meta import DeltaKernelMeta
from .pages import TokenPages


@triton.jit
def _replace_kernel(y_ptr, ids_ptr, index_ptr, values_ptr, start_ptr, id_start_ptr, count_ptr, slots_ptr, T, N, R,
                    stride_yt, stride_i, stride_vr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """y[t] = values[start[s] + j] where index[id_start[s] + j] == ids[t], j < count[s], s = slot[t] >= 0."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    slot = tl.load(slots_ptr + offs_t, mask=mask_t, other=-1)  # [BLOCK_T]
    has = slot >= 0
    tid = tl.load(ids_ptr + offs_t, mask=mask_t, other=-1)  # [BLOCK_T] int64
    cnt = tl.load(count_ptr + slot, mask=has, other=0)  # [BLOCK_T]
    first = tl.load(start_ptr + slot, mask=has, other=0).to(tl.int64)  # [BLOCK_T]
    id_first = tl.load(id_start_ptr + slot, mask=has, other=0).to(tl.int64)  # [BLOCK_T]
    pos = tl.full((BLOCK_T,), -1, dtype=tl.int32)
    for j0 in range(0, R, BLOCK_R):
        jj = j0 + tl.arange(0, BLOCK_R)
        live = has[:, None] & (jj[None, :] < cnt[:, None])
        idx = tl.load(index_ptr + (id_first[:, None] + jj[None, :]) * stride_i, mask=live, other=-1)  # [BT, BR]
        hit = live & (idx == tid[:, None])
        pos = tl.maximum(pos, tl.max(tl.where(hit, jj[None, :], -1), axis=1))
    mask = (pos >= 0)[:, None] & (offs_n < N)[None, :]
    v = tl.load(values_ptr + (first + pos.to(tl.int64))[:, None] * stride_vr + offs_n[None, :], mask=mask, other=0.0)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :], v.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _scatter_kernel(logits_ptr, h_ptr, index_ptr, id_start_ptr, count_ptr, sorted_ptr, active_ptr, seg_start_ptr,
                    num_active_ptr, stride_lt, stride_ht, stride_i, CAPACITY: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """logits[tok, index[id_start[s] + r]] = h[seg0 + m, r] for r < count[s] (h: the shrink's fp32 output)."""
    pid_m = tl.program_id(0)
    pid_a = tl.program_id(1)
    slot, cnt, seg0, seg_len = _segment(active_ptr, seg_start_ptr, count_ptr, num_active_ptr, pid_a, CAPACITY)
    id_first = tl.load(id_start_ptr + slot).to(tl.int64)  # slot 0 for a program past the active count
    r0 = tl.program_id(2) * BLOCK_R
    m0 = pid_m * BLOCK_M
    if (r0 < cnt) & (m0 < seg_len):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_m < seg_len)[:, None] & (offs_r < cnt)[None, :]
        tok = tl.load(sorted_ptr + seg0 + offs_m, mask=offs_m < seg_len, other=0).to(tl.int64)
        col = tl.load(index_ptr + (id_first + offs_r) * stride_i, mask=offs_r < cnt, other=0)  # int64
        v = tl.load(h_ptr + (seg0 + offs_m).to(tl.int64)[:, None] * stride_ht + offs_r[None, :], mask=mask,
                    other=0.0)
        tl.store(logits_ptr + tok[:, None] * stride_lt + col[None, :], v.to(logits_ptr.dtype.element_ty), mask=mask)


def triton_replace_rows(y: torch.Tensor, ids: torch.Tensor, pages: TokenPages, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.replace_rows`` (which checks the arguments; semantics there)."""
    require_triton(y, "replace_rows")
    if meta.skippable or pages.max_count == 0:
        return
    num_tokens, n = y.shape
    bt, bn = min(32, next_pow2(num_tokens)), min(256, next_pow2(n))
    br = min(64, next_pow2(pages.max_count))
    grid = (triton.cdiv(num_tokens, bt), triton.cdiv(n, bn))
    _replace_kernel[grid](y, ids, pages.ids, pages.values, pages.start, pages.id_start, pages.count, meta.token_slots,
                          num_tokens, n, pages.max_count, y.stride(0), pages.ids.stride(0), pages.values.stride(0),
                          BLOCK_T=bt, BLOCK_R=br, BLOCK_N=bn)


def triton_head_rows(logits: torch.Tensor, h: torch.Tensor, pages: TokenPages, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.head_rows``: shrink (``count`` as the rank) then scatter."""
    require_triton(logits, "head_rows")
    if meta.skippable or pages.max_count == 0:
        return
    dots = shrink(h, pages.values, pages.start, pages.count, pages.max_count, meta)  # [N, R] fp32, segment order
    m_ext, a_ext, _, num_active = segment_args(meta)
    bm = min(64, next_pow2(max(m_ext, 1)))
    grid = (triton.cdiv(m_ext, bm), a_ext, triton.cdiv(pages.max_count, RANK_TILE))
    _scatter_kernel[grid](logits, dots, pages.ids, pages.id_start, pages.count, *meta.launch_index, num_active,
                          logits.stride(0), dots.stride(0), pages.ids.stride(0), CAPACITY=meta.capacity, BLOCK_M=bm,
                          BLOCK_R=RANK_TILE)
