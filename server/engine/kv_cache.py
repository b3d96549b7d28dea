"""Paged KV cache: the per-layer K/V block pools (torch) and their refcounted block ids (``block_pool.py``).

Layout follows vLLM's PagedAttention: the cache of every layer is cut into fixed-size blocks of
``block_size`` token positions; a sequence owns a *block table* (list of block ids, in token order), so a
sequence's position p lives at flat row ``block_table[p // block_size] * block_size + p % block_size``.
Blocks are allocated as a sequence grows and released the moment it finishes, is aborted or preempted,
so memory is never reserved for ``max_model_len`` tokens per request. A block may be in several tables
(a delta's prompt prefix, a cached run of prompt tokens): it is freed with its last reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_pool import BlockPool

CPU_DEFAULT_KV_BYTES = 1 << 30
"""kv_blocks == 0 on the CPU: size the pool to 1 GiB (the 4-layer benchmark model stores 8 KiB per token,
so 1 GiB holds 131k tokens, far more than 64 running sequences of 2048 tokens)."""
CUDA_FREE_FRACTION = 0.7
"""kv_blocks == 0 on CUDA: 70% of the memory free once weights and delta pools are allocated (vLLM's
gpu_memory_utilization idea; the rest covers activations of a max_batch_tokens step)."""


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


def kv_layout_for(model_config, block_size: int, num_blocks: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> KVLayout:
    """Reads the KV geometry from an HF config (Llama family: num_key_value_heads; GPT-2: n_head)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = cfg.num_hidden_layers
    layout = KVLayout(layers, kv_heads, head_dim, block_size, num_blocks)
    if num_blocks == 0:
        budget = CPU_DEFAULT_KV_BYTES
        if torch.device(device).type == "cuda":
            budget = int(torch.cuda.mem_get_info(torch.device(device))[0] * CUDA_FREE_FRACTION)
        layout.num_blocks = max(1, budget // (layout.bytes_per_token(dtype) * block_size))
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
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, rows, kv_heads, head_dim]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [layers, rows, kv_heads, head_dim]

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
