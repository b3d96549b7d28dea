"""BlockPool: refcounts, the content index and the LRU of idle cached blocks; exact counts, no leaks."""
from __future__ import annotations

import pytest

from delta_store.errors import InvalidArgument
from server.engine.block_pool import BlockPool


def test_allocate_free_and_counts():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1] and pool.num_used == 2 and pool.num_free == 2
    pool.free([0, 1])
    assert pool.num_used == 0 and pool.allocate(4) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="asked for 1 blocks, 0 free"):
        pool.allocate(1)
    with pytest.raises(InvalidArgument):
        BlockPool(0)


def test_shared_block_lives_until_its_last_reference():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    assert pool.register(b, b"k")
    pool.ref(b)  # a second sequence shares it
    pool.free([b])
    assert pool.refs(b) == 1 and pool.num_used == 1
    pool.free([b])
    assert pool.num_used == 0 and pool.num_cached == 1 and pool.lookup(b"k") == b  # idle, still findable
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([b])


def test_idle_cached_blocks_are_evicted_least_recent_first_and_only_when_needed():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.register(b, bytes([i]))
    pool.free([blocks[1]])
    pool.free([blocks[0]])
    pool.free([blocks[2]])  # idle order: 1, 0, 2
    pool.ref(blocks[0])  # used again: no longer idle
    assert pool.num_free == 2 and pool.evictions == 0
    assert pool.allocate(1) == [blocks[1]] and pool.evictions == 1 and pool.lookup(bytes([1])) is None
    assert pool.lookup(bytes([2])) == blocks[2] and pool.lookup(bytes([0])) == blocks[0]


def test_register_rules_and_unregister():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.register(a, b"x") and not pool.register(b, b"x") and not pool.register(a, b"y")
    pool.free([b])
    with pytest.raises(RuntimeError, match="not referenced"):
        pool.register(b, b"z")
    with pytest.raises(RuntimeError, match="only a registered block can be shared"):
        pool.ref(b)
    pool.free([a])
    pool.unregister(a)  # a failed computation: the idle block is plain free now
    assert pool.num_cached == 0 and pool.num_free == 3 and pool.lookup(b"x") is None
