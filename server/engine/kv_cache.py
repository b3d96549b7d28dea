"""Paged KV cache: the per-layer K/V block pools (torch) and their refcounted block ids (``block_pool.py``).

Layout follows vLLM's PagedAttention: the cache of every layer is cut into fixed-size blocks of
``block_size`` token positions; a sequence owns a *block table* (list of block ids, in token order), so a
sequence's position p lives at flat row ``block_table[p // block_size] * block_size + p % block_size``.
Blocks are allocated as a sequence grows and released the moment it finishes, is aborted or preempted,
so memory is never reserved for ``max_model_len`` tokens per request. A block may be in several tables
(a delta's prompt prefix, a cached run of prompt tokens): it is freed with its last reference. The pools are
sized by a byte budget (``server/memory.py``) and allocated uninitialised: nothing reads a row before it is
written (decode reads past a sequence's length are clamped to its last row, ``attention.build_step``), so on
the CPU the pages of a 1 GiB cache are mapped only as blocks are first used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_pool import BlockPool


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


@dataclass(slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        return self.bytes_per_token(dtype) * self.block_size


def kv_layout_for(model_config, block_size: int, num_blocks: int, dtype: torch.dtype,
                  budget_bytes: int = 0) -> KVLayout:
    """Reads the KV geometry from an HF config (Llama family: num_key_value_heads; GPT-2: n_head); ``num_blocks``
    0 sizes the pool to ``budget_bytes``."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = cfg.num_hidden_layers
    layout = KVLayout(layers, kv_heads, head_dim, block_size, num_blocks)
    if num_blocks == 0:
        layout.num_blocks = max(1, budget_bytes // layout.bytes_per_block(dtype))
    return layout


class KVCache:
    """The K/V block pools of every layer plus the allocator that hands their blocks out.

    ``k[layer]`` and ``v[layer]`` are ``[num_blocks * block_size, num_kv_heads, head_dim]``: one row per
    token position, so writing a packed batch is one ``index_copy_`` and reading is one ``index_select``.
    """

    def __init__(self, layout: KVLayout, dtype: torch.dtype, device: torch.device | str):
        self.layout = layout
        self.block_size = layout.block_size
        self.allocator = BlockPool(layout.num_blocks)
        rows = layout.num_blocks * layout.block_size
        shape = (layout.num_layers, rows, layout.num_kv_heads, layout.head_dim)
        # uninitialised: never zero-filled, so untouched blocks cost no resident memory on the CPU
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [layers, rows, kv_heads, head_dim]
        self.v = torch.empty(shape, dtype=dtype, device=device)  # [layers, rows, kv_heads, head_dim]

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
