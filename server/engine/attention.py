"""The bridge between the paged KV cache and an *unchanged* Hugging Face forward (D6).

The model runs as ``model(input_ids=[1, T], position_ids=[1, T], cache=PagedCache, paged_step=step)``:
one packed row holding every scheduled sequence's new tokens (decode tokens first, then prefill chunks).
Two public transformers extension points carry it:

* :class:`PagedCache` subclasses ``transformers.Cache``. Every attention layer of the Llama family and GPT-2
  calls ``cache.update(key, value, layer_idx, kwargs=...)`` right after projecting K/V; ``update`` writes the
  packed batch's new K/V into their block rows and returns the K/V rows every query of the step reads
  (one ``index_select``), as transformers' own ``PagedAttentionCache.update`` does with its read/write indices.
* :func:`paged_attention` is registered in ``AttentionInterface`` as ``"deltaserve_paged"``; the model's
  ``config._attn_implementation`` names it. It gets the step metadata through the forward's ``**kwargs``
  (the path transformers' continuous batching uses for ``cu_seq_lens_q``) and runs, per step:
  one padded SDPA for all decode tokens (``[B, H, 1, D]`` against ``[B, Hkv, Lmax, D]`` with a length
  mask: decode steps dominate, so no per-sequence Python there) and one causal SDPA per prefill chunk.

Because ``"deltaserve_paged"`` has no mask function in ``AttentionMaskInterface``, ``create_causal_mask``
returns None without building anything (transformers 5.24 ``masking_utils._preprocess_mask_arguments``);
that behaviour, the ``update(..., kwargs=)`` call and the kwargs threading are what this module leans on,
and ``tests/test_engine_attention.py`` fails loudly when the pinned transformers changes any of them.
A forward without ``paged_step`` (e.g. ``model.generate``) falls back to plain SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kv_cache import KVCache

ATTN_IMPLEMENTATION = "deltaserve_paged"
PINNED_TRANSFORMERS = "5.24."  # the version whose internals the docstring above describes


@dataclass(slots=True)
class PrefillPart:
    q_start: int  # offset of the chunk in the packed batch
    q_len: int
    k_start: int  # offset of the sequence's K/V rows in the gathered read
    k_len: int  # = positions already cached + q_len
    past: int  # positions before the chunk (chunked prefill / recompute)


@dataclass(slots=True)
class PagedStep:
    """Per-step attention metadata, built once and shared by every layer."""

    write_rows: torch.Tensor  # [T] int64 cache row of each packed token
    read_rows: torch.Tensor  # [R] int64 rows gathered for the queries: decode block then prefill parts
    num_decode: int  # first num_decode packed tokens are one-token chunks, one per sequence
    decode_len: int  # Lmax: padded key length of the decode block (R starts with num_decode * Lmax rows)
    decode_lens: torch.Tensor  # [num_decode] int64 key length of each decode sequence
    prefill: list[PrefillPart] = field(default_factory=list)
    _masks: dict = field(default_factory=dict)  # sliding window -> (decode mask, prefill masks)

    def masks(self, window: int | None, device) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Boolean keep-masks, built once per step per window size (True = attend)."""
        if window is not None and window >= self.decode_len and all(p.k_len <= window for p in self.prefill):
            window = None  # the window never bites: same masks as full attention
        if window in self._masks:
            return self._masks[window]
        dec = None
        if self.num_decode:
            j = torch.arange(self.decode_len, device=device)  # [Lmax] key positions
            lens = self.decode_lens.to(device)[:, None]  # [B, 1]
            keep = j[None, :] < lens  # [B, Lmax]
            if window is not None:
                keep &= j[None, :] > lens - 1 - window
            dec = keep[:, None, None, :]  # [B, 1, 1, Lmax]
        pre: list[torch.Tensor | None] = []
        for p in self.prefill:
            if p.past == 0 and window is None:
                pre.append(None)  # plain causal: SDPA's is_causal path
                continue
            qpos = torch.arange(p.q_len, device=device)[:, None] + p.past  # [Lq, 1]
            kpos = torch.arange(p.k_len, device=device)[None, :]  # [1, Lk]
            keep = kpos <= qpos
            if window is not None:
                keep &= kpos > qpos - window
            pre.append(keep[None, None])  # [1, 1, Lq, Lk]
        self._masks[window] = (dec, pre)
        return dec, pre


def build_step(kv: KVCache, block_tables: list[list[int]], starts: list[int], lengths: list[int],
               device) -> PagedStep:
    """Metadata for one packed batch. Sequences with ``lengths[i] == 1`` must come first (decode block)."""
    bs = kv.block_size
    num_decode = 0
    while num_decode < len(lengths) and lengths[num_decode] == 1:
        num_decode += 1
    write_parts: list[torch.Tensor] = []
    read_parts: list[torch.Tensor] = []
    decode_len = 0
    decode_lens = torch.zeros(0, dtype=torch.long)
    if num_decode:
        pos = torch.tensor(starts[:num_decode], dtype=torch.long)  # [B] position of each decode token
        decode_lens = pos + 1
        decode_len = int(decode_lens.max())
        nb = (decode_len + bs - 1) // bs
        table = torch.tensor([bt[:nb] + [0] * (nb - len(bt[:nb])) for bt in block_tables[:num_decode]],
                             dtype=torch.long)  # [B, nb] padded with block 0 (masked out)
        rows = (table[:, :, None] * bs + torch.arange(bs)).reshape(num_decode, nb * bs)[:, :decode_len]  # [B, Lmax]
        write_parts.append(rows.gather(1, pos[:, None]).squeeze(1))
        # Positions past a sequence's length are masked out, but SDPA still multiplies their V by 0: they must
        # hold numbers, and the cache is never zero-filled. Read the sequence's own last row there instead.
        within = torch.minimum(torch.arange(decode_len)[None, :], pos[:, None])  # [B, Lmax]
        read_parts.append(rows.gather(1, within).reshape(-1))
    prefill = []
    k_offset = num_decode * decode_len
    q_offset = num_decode
    for bt, start, n in zip(block_tables[num_decode:], starts[num_decode:], lengths[num_decode:]):
        end = start + n
        nb = (end + bs - 1) // bs
        rows = (torch.tensor(bt[:nb], dtype=torch.long)[:, None] * bs + torch.arange(bs)).reshape(-1)[:end]  # [end]
        write_parts.append(rows[start:])
        read_parts.append(rows)
        prefill.append(PrefillPart(q_offset, n, k_offset, end, start))
        q_offset += n
        k_offset += end
    return PagedStep(write_rows=torch.cat(write_parts).to(device), read_rows=torch.cat(read_parts).to(device),
                     num_decode=num_decode, decode_len=decode_len, decode_lens=decode_lens, prefill=prefill)


class PagedCache(Cache):
    """A transformers ``Cache`` whose storage is the engine's block pools; refilled per step (``set_step``)."""

    def __init__(self, kv: KVCache):
        super().__init__(layers=[])
        self.kv = kv
        self.step: PagedStep | None = None

    def set_step(self, step: PagedStep) -> None:
        self.step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value_states: [1, Hkv, T, D] of the packed batch -> the gathered [1, Hkv, R, D] K/V to read."""
        step = self.step
        k_pool, v_pool = self.kv.k[layer_idx], self.kv.v[layer_idx]  # [rows, Hkv, D]
        k_pool.index_copy_(0, step.write_rows, key_states[0].transpose(0, 1).to(k_pool.dtype))
        v_pool.index_copy_(0, step.write_rows, value_states[0].transpose(0, 1).to(v_pool.dtype))
        k = k_pool.index_select(0, step.read_rows)  # [R, Hkv, D]
        v = v_pool.index_select(0, step.read_rows)
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions always come as explicit position_ids

    def get_mask_sizes(self, *args, **kwargs):
        raise RuntimeError("PagedCache builds no HF mask: the model must use attn_implementation "
                           f"{ATTN_IMPLEMENTATION!r}")


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    paged_step: PagedStep | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D]; key/value [1, Hkv, R, D] from PagedCache.update -> ([1, T, H, D], None)."""
    if paged_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    step = paged_step
    _, heads, num_tokens, head_dim = query.shape
    kv_heads = key.shape[1]
    gqa = heads != kv_heads
    k_rows, v_rows = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [R, Hkv, D] (contiguous views)
    q = query[0]  # [H, T, D]
    out = query.new_empty(num_tokens, heads, head_dim)  # [T, H, D]
    dec_mask, pre_masks = step.masks(kwargs.get("sliding_window"), query.device)
    b, lmax = step.num_decode, step.decode_len
    if b:
        qd = q[:, :b].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        kd = k_rows[: b * lmax].view(b, lmax, kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, Lmax, D]
        vd = v_rows[: b * lmax].view(b, lmax, kv_heads, head_dim).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dec_mask, scale=scaling, enable_gqa=gqa)
        out[:b] = od.squeeze(2)  # [B, H, D]
    for part, mask in zip(step.prefill, pre_masks):
        qp = q[:, part.q_start: part.q_start + part.q_len].unsqueeze(0)  # [1, H, Lq, D]
        kp = k_rows[part.k_start: part.k_start + part.k_len].transpose(0, 1).unsqueeze(0)  # [1, Hkv, Lk, D]
        vp = v_rows[part.k_start: part.k_start + part.k_len].transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                            enable_gqa=gqa)  # [1, H, Lq, D]
        out[part.q_start: part.q_start + part.q_len] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)


def use_paged_attention(model: torch.nn.Module) -> None:
    """Point the model (and every sub-config) at the paged attention function."""
    model.config._attn_implementation = ATTN_IMPLEMENTATION
