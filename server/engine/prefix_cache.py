"""Shared KV prefixes (D14): a prompt delta's virtual tokens, and automatic prefix caching of full blocks.

Every sequence lives in *slot space*: its first ``N`` cache slots are the virtual tokens of its delta's
prompt part (N = 0 without one), then its real tokens. Block ``j`` covers slots ``[j * B, (j + 1) * B)``
and is named by a hash chain::

    h[-1] = sha256("deltaserve/kv/" + seed)        seed = "delta:<content digest>" | "base:<fingerprint>"
    h[j]  = sha256(h[j - 1] + int64 bytes of the block's slots)

where a virtual slot ``s`` contributes ``-(s + 1)`` and a real slot its token id. The seed is the delta
version's *content* digest: another delta, or another version of the same name, starts another chain,
so no two of them can ever share KV (vLLM keyed cached blocks by adapter name and served stale KV after a
same-name reload: #42125, #30931). The K/V of a block depend only on the delta and the tokens up to its
end, which is exactly what the chain covers.

* **Prompt prefix.** The ``N // B`` full virtual blocks are registered under their chain hashes, the
  ``N % B`` rows of a partly filled last one (the *tail*) under ``sha256(h[N // B - 1] + its markers)``.
  The first sequence of a delta version whose prefix is not cached allocates them and queues a
  :class:`PromptJob`; the runner fills them before that step's forward. Every sequence of the delta then
  references the full blocks and pins the tail; it gets its own last block with the tail's rows copied
  in (a :class:`BlockCopy` of ``N % B`` rows, never the whole prefix), where its first tokens go.
* **Prefix caching** (``enabled``): a new sequence walks the chain over its real tokens and takes every
  full block already cached (stopping one token short of its end, whose logits it needs); full blocks it
  computes are registered once the step that wrote them succeeded. Idle blocks sit in the pool's LRU.

Pure Python, like the scheduler that calls it.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Protocol

from .block_pool import BlockPool


class PromptInfo(Protocol):
    """What the cache needs of a resident delta's prompt part (``delta_store.prompt.PromptPart``)."""

    @property
    def num_virtual_tokens(self) -> int: ...
    @property
    def position_offset(self) -> int: ...


@dataclass(slots=True)
class PromptJob:
    """Compute a delta's prefix K/V into ``rows`` (slot order) with the delta in ``slot`` active."""

    slot: int
    rows: list[int]  # N cache rows: block * B + offset
    blocks: list[int]  # the blocks holding them; referenced by the job until its step ends


@dataclass(slots=True)
class BlockCopy:
    """Copy the first ``num_rows`` rows of block ``src`` to block ``dst``, every layer, K and V."""

    src: int
    dst: int
    num_rows: int


@dataclass(slots=True)
class PrefixStats:
    lookups: int = 0  # full token blocks looked up (automatic prefix caching)
    hits: int = 0  # ... found cached
    prompt_computes: int = 0  # prompt prefixes computed (a delta version's first use, or after eviction)
    prompt_hits: int = 0  # sequences that found their delta's prefix cached


def delta_seed(digest: str) -> str:
    """The chain seed of a delta version: its content digest (never its name or version number)."""
    return f"delta:{digest}"


def chain_root(seed: str) -> bytes:
    return hashlib.sha256(b"deltaserve/kv/" + seed.encode()).digest()


def chain_next(parent: bytes, slots: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", slots).tobytes()).digest()


@dataclass(slots=True)
class _Prefix:
    full: list[int] = field(default_factory=list)  # full virtual blocks
    hashes: list[bytes] = field(default_factory=list)
    tail: int | None = None  # the partly filled last virtual block


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int, *, enabled: bool = True, base_seed: str = ""):
        self.pool = pool
        self.block_size = block_size
        self.enabled = enabled
        self.base_seed = base_seed
        self.stats = PrefixStats()
        self._jobs: list[PromptJob] = []
        self._copies: list[BlockCopy] = []

    # ---- chain ----------------------------------------------------------------------------------
    def seed(self, seq) -> str:
        return delta_seed(seq.delta.digest) if seq.delta is not None else f"base:{self.base_seed}"

    def _slots(self, seq, j: int, end: int | None = None) -> list[int]:
        """The chain input of block ``j`` of ``seq`` (up to slot ``end``): markers, then token ids."""
        bs, n = self.block_size, seq.num_virtual
        lo, hi = j * bs, (j + 1) * bs if end is None else end
        marks = [-(s + 1) for s in range(lo, min(hi, n))]
        return marks + (seq.token_ids(max(lo, n), hi) if hi > n else [])

    # ---- the prompt prefix of a delta -----------------------------------------------------------
    def _prompt_prefix(self, root: bytes, n: int, slot: int) -> tuple[_Prefix | None, bool]:
        """(the delta's cached prefix, False) with no references taken, or (a freshly allocated one with a
        queued job holding one reference each, True); (None, False) if the pool cannot hold it now."""
        bs = self.block_size
        full, tail_rows = divmod(n, bs)
        hashes, parent = [], root
        for j in range(full):
            parent = chain_next(parent, [-(s + 1) for s in range(j * bs, (j + 1) * bs)])
            hashes.append(parent)
        tail_key = chain_next(parent, [-(s + 1) for s in range(full * bs, n)]) if tail_rows else None
        found = [self.pool.lookup(h) for h in hashes]
        tail = self.pool.lookup(tail_key) if tail_key is not None else None
        if all(b is not None for b in found) and (tail_key is None or tail is not None):
            return _Prefix(found, hashes, tail), False
        need = full + (1 if tail_rows else 0)
        if not self.pool.can_allocate(need):
            return None, False
        blocks = self.pool.allocate(need)
        for old in found + [tail]:  # part of an older copy survived eviction: the new copy replaces it
            if old is not None:
                self.pool.unregister(old)
        keys = hashes + ([tail_key] if tail_key is not None else [])
        for block, key in zip(blocks, keys):
            self.pool.register(block, key)
        rows = [blocks[s // bs] * bs + s % bs for s in range(n)]
        self._jobs.append(PromptJob(slot, rows, blocks))
        self.stats.prompt_computes += 1
        return _Prefix(blocks[:full], hashes, blocks[full] if tail_rows else None), True

    def prepare(self, seed: str, slot: int, part: PromptInfo) -> bool:
        """Compute a delta's prefix ahead of its first request (the delta was just made resident).
        False when it is cached already or the pool has no room now (a request computes it later)."""
        return self._prompt_prefix(chain_root(seed), part.num_virtual_tokens, slot)[1]

    # ---- a sequence joins -----------------------------------------------------------------------
    def attach(self, seq, slot: int, part: PromptInfo | None) -> bool:
        """Give an admitted sequence its shared blocks: the delta's prefix (if any) and every cached full
        block of its tokens. Sets ``block_table``, ``block_hashes``, ``pinned_blocks``, ``num_computed``.
        Returns False (and changes nothing) if the pool cannot hold what must be allocated."""
        bs, pool = self.block_size, self.pool
        n = part.num_virtual_tokens if part is not None else 0
        seq.num_virtual = n
        seq.position_offset = part.position_offset if part is not None else 0
        root = chain_root(self.seed(seq))
        table: list[int] = []
        hashes: list[bytes] = []
        pinned: list[int] = []
        if n:
            prefix, computed_now = self._prompt_prefix(root, n, slot)
            if prefix is None:
                return False
            for block in prefix.full:
                pool.ref(block)
            table, hashes = list(prefix.full), list(prefix.hashes)
            if prefix.tail is not None:
                pool.ref(prefix.tail)
                pinned.append(prefix.tail)
            self.stats.prompt_hits += not computed_now
        parent = hashes[-1] if hashes else root
        limit = seq.num_tokens - 1  # the last token is always computed: its logits give the next one
        j = len(table)
        while self.enabled and (j + 1) * bs <= limit:
            key = chain_next(parent, self._slots(seq, j))
            self.stats.lookups += 1
            block = pool.lookup(key)
            if block is None:
                break
            self.stats.hits += 1
            pool.ref(block)
            table.append(block)
            hashes.append(key)
            parent, j = key, j + 1
        computed = len(table) * bs if len(table) > n // bs else n
        if pinned and len(table) > n // bs:  # the block after the prefix's tail is cached: no copy needed
            pool.free(pinned)
            pinned = []
        if pinned:  # the first real tokens share a block with the prefix's tail: copy its rows into our own
            if not pool.can_allocate(1):
                pool.free(table + pinned)
                return False
            own = pool.allocate(1)[0]
            self._copies.append(BlockCopy(pinned[0], own, n % bs))
            table.append(own)
        seq.block_table, seq.block_hashes, seq.pinned_blocks = table, hashes, pinned
        seq.num_computed = computed
        return True

    # ---- a step ends ----------------------------------------------------------------------------
    def take_jobs(self) -> tuple[list[PromptJob], list[BlockCopy]]:
        """This step's prefix computations and tail copies, for the runner (before the forward).
        The jobs stay pending until :meth:`commit` or :meth:`abort`."""
        return list(self._jobs), self._copies

    def commit(self, seqs) -> None:
        """The step succeeded: register the full blocks it completed; jobs release their references."""
        self._release_jobs()
        self._copies = []
        if not self.enabled:
            return
        bs = self.block_size
        for seq in seqs:
            if not seq.block_table:
                continue  # finished (aborted) while the step ran
            full = min(seq.num_computed // bs, len(seq.block_table))
            while len(seq.block_hashes) < full:
                j = len(seq.block_hashes)
                parent = seq.block_hashes[-1] if seq.block_hashes else chain_root(self.seed(seq))
                key = chain_next(parent, self._slots(seq, j))
                self.pool.register(seq.block_table[j], key)
                seq.block_hashes.append(key)

    def abort(self) -> None:
        """The step failed: the prefixes it was to compute hold nothing; forget them."""
        for job in self._jobs:
            for block in job.blocks:
                self.pool.unregister(block)
        self._release_jobs()
        self._copies = []

    def _release_jobs(self) -> None:
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            self.pool.free(job.blocks)
