"""BlockPool: the KV cache's block ids, refcounted, with a content index for blocks worth keeping.

A block is referenced by every sequence whose block table holds it: a delta's shared prompt prefix
(D14) is one set of blocks in many tables, and so is a cached run of prompt tokens. ``free`` drops one
reference; a block nobody references goes back to the free list, unless it is *registered* under a
content key (a hash chain over the tokens and the delta that produced its K/V, see ``prefix_cache.py``):
then it waits in an LRU of idle cached blocks, where a later sequence with the same content finds it
(``lookup`` + ``ref``) or an allocation that finds the free list empty evicts the oldest. So cached KV
costs nothing until memory is needed (vLLM's free-block queue with lazy eviction, ``v1/core/block_pool.py``).

Pure Python: the scheduler moves blocks around without touching tensors. Counts are exact, so tests
can check that nothing leaks: ``num_used`` is the blocks some sequence references.
"""
from __future__ import annotations

from collections import OrderedDict

from delta_store.errors import InvalidArgument


class BlockPool:
    __slots__ = ("num_blocks", "_free", "_refs", "_key_of", "_by_key", "_idle", "evictions")

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise InvalidArgument(f"kv cache: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Reversed so that pop() hands out 0, 1, 2, ... first: deterministic layouts in tests.
        self._free = list(range(num_blocks - 1, -1, -1))  # unreferenced, holding nothing worth keeping
        self._refs = [0] * num_blocks
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # unreferenced registered blocks, least recent first
        self.evictions = 0  # registered blocks reclaimed for new content

    # ---- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free ones plus idle cached ones (evicted on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence (or a pending prefix computation)."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Idle blocks kept for their content (evictable)."""
        return len(self._idle)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def refs(self, block: int) -> int:
        return self._refs[block]

    # ---- references -----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with one reference each; the free list first, then the least recently used idle ones."""
        if n > self.num_free:
            raise RuntimeError(f"kv cache: asked for {n} blocks, {self.num_free} free")  # the scheduler checks first
        if n == 0:
            return []
        take = min(n, len(self._free))
        blocks = self._free[len(self._free) - take:]
        del self._free[len(self._free) - take:]
        blocks.reverse()
        while len(blocks) < n:
            block, _ = self._idle.popitem(last=False)
            del self._by_key[self._key_of[block]]
            self._key_of[block] = None
            self.evictions += 1
            blocks.append(block)
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def ref(self, block: int) -> None:
        """One more reference (a sequence sharing a cached or prompt-prefix block)."""
        if self._refs[block] == 0:
            if block not in self._idle:
                raise RuntimeError(f"kv cache: block {block} is free; only a registered block can be shared")
            del self._idle[block]
        self._refs[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; unreferenced ones go idle (registered) or free."""
        for block in reversed(blocks):
            refs = self._refs[block]
            assert refs > 0, f"kv cache: block {block} was freed twice"
            self._refs[block] = refs - 1
            if refs == 1:
                if self._key_of[block] is not None:
                    self._idle[block] = None  # most recently used end
                else:
                    self._free.append(block)

    # ---- the content index ----------------------------------------------------------------------
    def lookup(self, key: bytes) -> int | None:
        """The block registered under ``key``, or None. Takes no reference (see :meth:`ref`)."""
        return self._by_key.get(key)

    def register(self, block: int, key: bytes) -> bool:
        """Index a referenced block's content; False if the key or the block is already registered
        (two sequences computed the same content: the first one stays the cached copy)."""
        if self._refs[block] == 0:
            raise RuntimeError(f"kv cache: block {block} is not referenced; register it while it is in use")
        if key in self._by_key or self._key_of[block] is not None:
            return False
        self._key_of[block] = key
        self._by_key[key] = block
        return True

    def unregister(self, block: int) -> None:
        """Forget a block's content (a computation that failed); an idle block becomes free."""
        key = self._key_of[block]
        if key is None:
            return
        del self._by_key[key]
        self._key_of[block] = None
        if block in self._idle:
            del self._idle[block]
            self._free.append(block)
