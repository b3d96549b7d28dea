"""Paged KV cache: a free-block allocator (pure Python) and the per-layer K/V block pools (torch).

Layout follows vLLM's PagedAttention: the cache of every layer is cut into fixed-size blocks of
``block_size`` token positions; a sequence owns a *block table* (list of block ids, in token order), so a
sequence's position p lives at flat row ``block_table[p // block_size] * block_size + p % block_size``.
Blocks are allocated as a sequence grows and returned the moment it finishes, is aborted or preempted,
so memory is never reserved for ``max_model_len`` tokens per request. The pools are sized by a byte budget
(``server/memory.py``) and allocated uninitialised: nothing reads a row before it is written (decode reads
past a sequence's length are clamped to its last row, ``attention.build_step``), so on the CPU the pages of a
1 GiB cache are mapped only as blocks are first used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from delta_store.errors import InvalidArgument


class BlockAllocator:
    """LIFO free list of block ids. Counts are exact so tests can check that nothing leaks."""

    __slots__ = ("num_blocks", "_free")

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise InvalidArgument(f"kv cache: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Reversed so that pop() hands out 0, 1, 2, ... first: deterministic layouts in tests.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"kv cache: asked for {n} blocks, {len(self._free)} free")  # scheduler checks first
        if n == 0:
            return []
        blocks = self._free[-n:]
        del self._free[-n:]
        blocks.reverse()
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        assert len(self._free) <= self.num_blocks, "kv cache: a block was freed twice"


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
        self.allocator = BlockAllocator(layout.num_blocks)
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
