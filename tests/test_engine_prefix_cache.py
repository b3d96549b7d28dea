"""PrefixCache on a BlockPool, without a model: which blocks a sequence shares, which it computes, what it
copies; the hash chain's seeds keep deltas, versions and the base apart. Sequences are the engine's own."""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.block_pool import BlockPool
from server.engine.prefix_cache import BlockCopy, PrefixCache
from server.engine.sequence import Sequence
from delta_store.records import DeltaKey
from server.types import GenerationRequest, SamplingParams

BS = 4


@dataclass
class Prompt:  # what the cache reads of a PromptPart
    num_virtual_tokens: int
    position_offset: int


def seq(tokens, digest=None, rid="r"):
    key = None if digest is None else DeltaKey("t", "d", 1, digest)
    return Sequence(GenerationRequest(rid, "t", list(tokens), SamplingParams(max_new_tokens=4), delta=key))


def computed(cache, s, n):
    """The scheduler's part: the step computed ``n`` more slots of ``s`` (blocks grown as needed)."""
    need = -(-(s.num_computed + n) // BS) - len(s.block_table)
    s.block_table += cache.pool.allocate(max(0, need))
    s.num_computed += n


def test_prompt_prefix_is_computed_once_and_shared_with_a_one_block_tail_copy():
    pool = BlockPool(16)
    cache = PrefixCache(pool, BS)
    part = Prompt(5, 5)  # 5 virtual tokens: one full block + a tail of 1 row
    a, b = seq(range(10, 16), "d1", "a"), seq(range(20, 23), "d1", "b")
    assert cache.attach(a, 3, part)
    jobs, copies = cache.take_jobs()
    assert len(jobs) == 1 and jobs[0].slot == 3 and len(jobs[0].rows) == 5
    full, tail = jobs[0].blocks
    assert jobs[0].rows == [full * BS + i for i in range(4)] + [tail * BS]
    assert a.block_table[0] == full and a.pinned_blocks == [tail] and copies == [BlockCopy(tail, a.block_table[1], 1)]
    assert (a.num_computed, a.num_virtual, a.position_offset, a.num_tokens) == (5, 5, 5, 11)
    assert cache.attach(b, 3, part)  # same delta version, same step: shares the pending prefix
    jobs, copies = cache.take_jobs()
    assert len(jobs) == 1 and b.block_table[0] == full and b.block_table[1] not in (full, tail, a.block_table[1])
    assert copies[-1] == BlockCopy(tail, b.block_table[1], 1)
    assert pool.refs(full) == 3 and pool.refs(tail) == 3  # the job and both sequences
    computed(cache, a, 6)
    computed(cache, b, 3)
    cache.commit([a, b])
    assert cache.take_jobs() == ([], []) and pool.refs(full) == 2
    assert cache.stats.prompt_computes == 1 and cache.stats.prompt_hits == 1
    for s in (a, b):
        pool.free(s.block_table + s.pinned_blocks)
    assert pool.num_used == 0 and pool.num_cached >= 2  # the prefix stays cached, idle and evictable
    c = seq([30, 31], "d1", "c")
    assert cache.attach(c, 7, part) and cache.take_jobs()[0] == []  # found cached, even in another slot
    assert c.block_table[0] == full and cache.stats.prompt_hits == 2


def test_full_token_blocks_are_reused_for_the_same_seed_only():
    pool = BlockPool(32)
    cache = PrefixCache(pool, BS, base_seed="fp")
    tokens = list(range(100, 113))  # 3 full blocks + 1
    a = seq(tokens, None, "a")
    assert cache.attach(a, -1, None) and a.num_computed == 0
    computed(cache, a, 13)
    cache.commit([a])
    b = seq(tokens + [7, 8], None, "b")
    assert cache.attach(b, -1, None)
    assert b.block_table == a.block_table[:3] and b.num_computed == 12 and cache.stats.hits == 3
    for digest in ("d1", "d2"):  # the same tokens under a delta (or its next version) share nothing
        other = seq(tokens, digest, digest)
        assert cache.attach(other, 0, None) and other.block_table == [] and other.num_computed == 0
    assert cache.stats.hits == 3
    exact = seq(tokens[:12], None, "x")  # 12 tokens = 3 full blocks: the last one is recomputed for its logits
    assert cache.attach(exact, -1, None) and exact.num_computed == 8
    diverge = seq(tokens[:5] + [1] * 8, None, "y")  # same first block only
    assert cache.attach(diverge, -1, None) and diverge.block_table == a.block_table[:1]


def test_the_block_after_a_prompt_tail_is_cached_too():
    pool = BlockPool(32)
    cache = PrefixCache(pool, BS)
    part = Prompt(6, 0)  # 1 full virtual block + 2 tail rows; AdapterHub-style positions
    a = seq([5, 6, 7, 8, 9], "d", "a")
    cache.attach(a, 0, part)
    computed(cache, a, 5)
    cache.commit([a])
    b = seq([5, 6, 7, 8], "d", "b")  # its first two tokens complete the tail block exactly as a's did
    assert cache.attach(b, 0, part)
    assert b.block_table == a.block_table[:2] and b.pinned_blocks == [] and b.num_computed == 8
    assert cache.take_jobs()[1] == []  # nothing to copy


def test_disabled_caching_still_shares_the_prompt_prefix():
    pool = BlockPool(32)
    cache = PrefixCache(pool, BS, enabled=False)
    part = Prompt(8, 8)
    a = seq(list(range(9)), "d", "a")
    cache.attach(a, 0, part)
    computed(cache, a, 9)
    cache.commit([a])
    b = seq(list(range(9)), "d", "b")
    cache.attach(b, 0, part)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8 and cache.stats.lookups == 0


def test_a_failed_step_forgets_the_prefix_it_was_to_compute():
    pool = BlockPool(8)
    cache = PrefixCache(pool, BS)
    a = seq([1, 2], "d", "a")
    cache.attach(a, 0, Prompt(4, 4))
    pool.free(a.block_table + a.pinned_blocks)  # the engine fails the step's sequences
    cache.abort()
    assert pool.num_used == 0 and pool.num_cached == 0
    b = seq([1, 2], "d", "b")
    cache.attach(b, 0, Prompt(4, 4))
    assert len(cache.take_jobs()[0]) == 1  # computed again


def test_no_room_changes_nothing():
    pool = BlockPool(2)
    cache = PrefixCache(pool, BS)
    a = seq([1], "d", "a")
    assert not cache.attach(a, 0, Prompt(9, 9))  # 2 full blocks + tail need 3
    assert pool.num_used == 0 and cache.take_jobs() == ([], [])
