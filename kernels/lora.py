"""Segmented LoRA shrink/expand in Triton (D3: each slot pays its own rank).

Design: tokens are grouped by slot once per step (``DeltaKernelMeta``, as vLLM's
``lora_kernel_metadata``); the grid is (M tiles of the longest segment, active slots, rank or output
tiles), like vLLM's ``_lora_shrink_kernel`` / ``_lora_expand_kernel``. Unlike vLLM, which pads compute
to ``max_lora_rank``, compute is bounded by each slot's real rank, as SGLang's chunked SGMV (it masks
loads past ``rank[w]``) and S-LoRA's MBGMV (its shrink exits for rank rows ``j >= rank``) do: shrink
programs whose 16-wide rank tile starts past ``rank[slot]`` exit at once, and the expand K-loop stops
at ``rank[slot]`` - a rank-4 slot costs one 16-wide tile next to a rank-64 slot's four.
Weights are read through each slot's int32 first row, ``start[slot]``, into row tensors (D13, ``pages.py``;
never a table of pointers: the interpreter cannot load pointers), so one launch serves every slot wherever
its rows live. The shrink result stays in an fp32 buffer ``h [N, R]`` in segment order, as
vLLM's fp32 shrink buffer; the expand adds ``scale * h @ B.T`` into ``y`` in place.

The shrink also serves bottleneck adapters (``HAS_BIAS``/``HAS_ACT``: down-projection bias and the
per-slot activation in its epilogue) and the expand their up-projection bias.
"""
from __future__ import annotations

import torch

from ._triton import DOT_MIN, INTERPRET, block, next_pow2, require_triton, tl, triton
from .meta import DeltaKernelMeta
from .pages import LoraPages

RANK_TILE = DOT_MIN
"""Rank tile of both kernels: the tl.dot minimum, so a rank-r slot runs ceil(r / 16) tiles."""


@triton.jit
def _activation(h, code):
    """kernels.activations.ACT_CODES: 0 relu, 1 exact erf GELU, 2 tanh GELU (gelu_new), 3 SiLU; on fp32 ``h``."""
    if code == 0:
        h = tl.maximum(h, 0.0)
    elif code == 1:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif code == 2:
        # 0.5 * (1 + tanh(z)) == sigmoid(2 z), z = sqrt(2/pi) * (h + 0.044715 h^3); no tanh needed
        h = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    else:
        h = h * tl.sigmoid(h)
    return h


@triton.jit
def _segment(active_ptr, seg_start_ptr, per_slot_ptr, count_ptr, pid_a, CAPACITY: tl.constexpr):
    """(slot, per_slot[slot], seg0, seg_len) of the program's segment ``pid_a``. ``CAPACITY`` (a grid sized by the
    buffers' capacity, ``kernels/meta.py``): programs past the step's active-slot count, read from the device, get
    a zero-length segment and a zero per-slot value, and read nothing from the buffers' stale tails; otherwise the
    grid is this step's and every program is live, as before."""
    if CAPACITY:
        live = pid_a < tl.load(count_ptr)
        slot = tl.load(active_ptr + pid_a, mask=live, other=0)
        value = tl.load(per_slot_ptr + slot, mask=live, other=0)
        seg0 = tl.load(seg_start_ptr + pid_a, mask=live, other=0)
        seg_len = tl.load(seg_start_ptr + pid_a + 1, mask=live, other=0) - seg0
    else:
        slot = tl.load(active_ptr + pid_a)
        value = tl.load(per_slot_ptr + slot)
        seg0 = tl.load(seg_start_ptr + pid_a)
        seg_len = tl.load(seg_start_ptr + pid_a + 1) - seg0
    return slot, value, seg0, seg_len


@triton.jit
def _shrink_kernel(x_ptr, w_ptr, wb_ptr, h_ptr, start_ptr, rank_ptr, act_ptr, sorted_ptr, active_ptr, seg_start_ptr,
                   count_ptr, K, stride_xt, stride_wr, stride_wb, stride_ht, M_HINT,
                   HAS_BIAS: tl.constexpr, HAS_ACT: tl.constexpr, CAST_FP32: tl.constexpr, CAPACITY: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[seg0 + m, r] = act(x[tok] @ w[row0 + r].T + wb[row0 + r]) for r < rank[slot], row0 = start[slot]."""
    pid_m = tl.program_id(0)
    pid_a = tl.program_id(1)
    pid_r = tl.program_id(2)
    slot, rank, seg0, seg_len = _segment(active_ptr, seg_start_ptr, rank_ptr, count_ptr, pid_a, CAPACITY)
    r0 = pid_r * BLOCK_R
    m0 = pid_m * BLOCK_M
    if (r0 < rank) & (m0 < seg_len):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        tok = tl.load(sorted_ptr + seg0 + offs_m, mask=mask_m, other=0).to(tl.int64)  # [BLOCK_M]
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        row0 = tl.load(start_ptr + slot).to(tl.int64)  # the slot's first row: an index, not a pointer
        w_rows = w_ptr + (row0 + offs_r)[None, :] * stride_wr  # [1, BLOCK_R]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            xt = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            wt = tl.load(w_rows + kk[:, None], mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
            if CAST_FP32:  # fp32 inputs, or the interpreter (bf16 tl.dot is wrong there)
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        if HAS_BIAS:
            b = tl.load(wb_ptr + (row0 + offs_r) * stride_wb, mask=mask_r, other=0.0)
            acc += b.to(tl.float32)[None, :]
        if HAS_ACT:
            acc = _activation(acc, tl.load(act_ptr + slot))
        tl.store(h_ptr + (seg0 + offs_m).to(tl.int64)[:, None] * stride_ht + offs_r[None, :], acc,
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(h_ptr, w_ptr, ub_ptr, y_ptr, scale_ptr, start_ptr, rank_ptr, ub_row_ptr, col_ptr, sorted_ptr,
                   active_ptr, seg_start_ptr, count_ptr, N, stride_ht, stride_wr, stride_ub, stride_yt, M_HINT,
                   HAS_BIAS: tl.constexpr, HAS_COL: tl.constexpr, CAST_FP32: tl.constexpr, CAPACITY: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[tok, n] += scale[slot] * (h[seg0 + m, o : o + rank] @ w[row0 : row0 + rank, n] + ub[ub_row[slot], n]),
    o = row0 - col[slot] with HAS_COL (a packed member's columns of its stack's shrink), else 0."""
    pid_m = tl.program_id(0)
    pid_a = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot, rank, seg0, seg_len = _segment(active_ptr, seg_start_ptr, rank_ptr, count_ptr, pid_a, CAPACITY)
    m0 = pid_m * BLOCK_M
    if (rank > 0) & (m0 < seg_len):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        row0 = tl.load(start_ptr + slot).to(tl.int64)
        h_rows = h_ptr + (seg0 + offs_m).to(tl.int64)[:, None] * stride_ht
        if HAS_COL:
            h_rows += row0 - tl.load(col_ptr + slot).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, rank, BLOCK_K):  # the slot's own rank, not a pool's (D3)
            kk = k0 + offs_k
            mask_k = kk < rank
            ht = tl.load(h_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK] fp32
            wt = tl.load(w_ptr + (row0 + kk)[:, None] * stride_wr + offs_n[None, :],
                         mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
            if CAST_FP32:
                acc = tl.dot(ht, wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(ht.to(wt.dtype), wt, acc)
        if HAS_BIAS:
            ub_row = tl.load(ub_row_ptr + slot).to(tl.int64)
            b = tl.load(ub_ptr + ub_row * stride_ub + offs_n, mask=mask_n, other=0.0)
            acc += b.to(tl.float32)[None, :]
        acc = acc * tl.load(scale_ptr + slot)
        tok = tl.load(sorted_ptr + seg0 + offs_m, mask=mask_m, other=0).to(tl.int64)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


# A short list, tried only on CUDA (the interpreter gets one fixed, large-block config). Segments are
# short in decode (1 token per slot) and long in prefill, hence BLOCK_M 16..64; M_HINT keys on it.
_SHRINK_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_R": RANK_TILE, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                   for bm, bk, w, s in ((16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4),
                                        (64, 128, 8, 3))]
_EXPAND_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": RANK_TILE}, num_warps=w, num_stages=2)
                   for bm, bn, w in ((16, 64, 4), (16, 128, 4), (32, 128, 4), (64, 128, 8), (64, 64, 4))]
_shrink_tuned = triton.autotune(_SHRINK_CONFIGS, key=["K", "M_HINT", "CAST_FP32", "HAS_ACT", "CAPACITY"])(
    _shrink_kernel)
_expand_tuned = triton.autotune(_EXPAND_CONFIGS, key=["N", "M_HINT", "CAST_FP32", "HAS_BIAS", "HAS_COL", "CAPACITY"],
                                restore_value=["y_ptr"])(_expand_kernel)


def segment_args(meta: DeltaKernelMeta) -> tuple[int, int, int, torch.Tensor]:
    """(segment-axis extent, slot-axis extent, M_HINT, count pointer) of a launch walking ``meta``'s segments:
    this step's counts, or the capacity of a capacity meta (whose count pointer is read on the device; an
    ordinary meta passes ``seg_start`` there, never read)."""
    m_ext = meta.grid_tokens
    count = meta.num_active_dev if meta.capacity else meta.seg_start
    return m_ext, meta.grid_slots, next_pow2(max(m_ext, 1)), count


def shrink(x: torch.Tensor, w_rows: torch.Tensor, start: torch.Tensor, rank: torch.Tensor, r_bound: int,
           meta: DeltaKernelMeta, w_bias: torch.Tensor | None = None, act: torch.Tensor | None = None) -> torch.Tensor:
    """h [N, r_bound] fp32 in segment order: h[p, r] = act(x[tok_p] @ w_rows[start[s] + r] + w_bias[start[s] + r])
    for r < rank[s] (<= r_bound); rows of slots with rank 0 and columns past a slot's rank left unwritten.
    x [T, K], w_rows [N, K] (any row stride), w_bias [N] (any stride)."""
    r_pad = max(1, r_bound)
    num_rows = meta.num_tokens if meta.capacity else meta.num_active_tokens  # a capacity meta: any step's count
    h = torch.empty((num_rows, r_pad), dtype=torch.float32, device=x.device)  # [N, R]
    cast = INTERPRET or x.dtype == torch.float32
    m_ext, a_ext, m_hint, count = segment_args(meta)
    args = (x, w_rows, w_bias if w_bias is not None else w_rows, h, start, rank, act if act is not None else rank,
            *meta.launch_index, count,
            x.shape[1], x.stride(0), w_rows.stride(0), w_bias.stride(0) if w_bias is not None else 0,
            h.stride(0), m_hint)
    flags = dict(HAS_BIAS=w_bias is not None, HAS_ACT=act is not None, CAST_FP32=cast, CAPACITY=meta.capacity)
    if x.is_cuda and not INTERPRET:
        grid = lambda META: (triton.cdiv(m_ext, META["BLOCK_M"]), a_ext,  # noqa: E731
                             triton.cdiv(r_pad, META["BLOCK_R"]))
        _shrink_tuned[grid](*args, **flags)
    else:  # interpreter: few, large programs (each program costs ~ms of numpy)
        bm, bk = block(m_ext, 64), block(x.shape[1], 128)
        grid = (triton.cdiv(m_ext, bm), a_ext, triton.cdiv(r_pad, RANK_TILE))
        _shrink_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_R=RANK_TILE, BLOCK_K=bk)
    return h


def expand(y: torch.Tensor, h: torch.Tensor, w_rows: torch.Tensor, start: torch.Tensor, scale: torch.Tensor,
           rank: torch.Tensor, meta: DeltaKernelMeta, up_bias: torch.Tensor | None = None,
           up_bias_row: torch.Tensor | None = None, h_col: torch.Tensor | None = None) -> None:
    """y[tok_p] += scale[s] * (h[p, o : o + rank[s]] @ w_rows[start[s] : start[s] + rank[s]] + up_bias[up_bias_row[s]]),
    in place, o = start[s] - h_col[s] (``h_col`` int32 [S]: where slot s's columns of ``h`` begin in rows, a packed
    member's offset in its stack; None: o = 0). w_rows [N, out] (any row stride), up_bias [Nv, out]."""
    n_out = y.shape[1]
    cast = INTERPRET or y.dtype == torch.float32
    m_ext, a_ext, m_hint, count = segment_args(meta)
    has_bias = up_bias is not None
    args = (h, w_rows, up_bias if has_bias else w_rows, y, scale, start, rank, up_bias_row if has_bias else start,
            h_col if h_col is not None else start, *meta.launch_index, count, n_out, h.stride(0), w_rows.stride(0),
            up_bias.stride(0) if has_bias else 0, y.stride(0), m_hint)
    flags = dict(HAS_BIAS=has_bias, HAS_COL=h_col is not None, CAST_FP32=cast, CAPACITY=meta.capacity)
    if y.is_cuda and not INTERPRET:
        grid = lambda META: (triton.cdiv(m_ext, META["BLOCK_M"]), a_ext,  # noqa: E731
                             triton.cdiv(n_out, META["BLOCK_N"]))
        _expand_tuned[grid](*args, **flags)
    else:
        bm, bn = block(m_ext, 64), block(n_out, 128)
        grid = (triton.cdiv(m_ext, bm), a_ext, triton.cdiv(n_out, bn))
        _expand_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=RANK_TILE)


def triton_add_lora(y: torch.Tensor, x: torch.Tensor, pages: LoraPages, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.add_lora`` (which checks the arguments; semantics and shapes there):
    two launches, shrink into the fp32 ``h`` then expand into ``y``, both reading rows through ``pages.start``."""
    require_triton(y, "add_lora")
    if meta.skippable or pages.max_rank == 0:
        return
    h = shrink(x, pages.a_rows, pages.start, pages.rank, pages.max_rank, meta)  # [N, R] fp32
    expand(y, h, pages.b_rows, pages.start, pages.scale, pages.rank, meta)
