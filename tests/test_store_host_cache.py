"""Host tier: LRU by bytes, eviction under pressure, oversize entries, counters, thread safety."""
from __future__ import annotations

import threading

import pytest
import torch

from delta_store.delta import Delta, ModuleDelta
from delta_store.errors import InvalidArgument
from delta_store.host_cache import HostCache


def delta_of(nbytes: int) -> Delta:
    return Delta({"m": ModuleDelta(bias=torch.zeros(nbytes // 4))})  # fp32: 4 bytes each


def test_lru_order_and_byte_budget():
    cache = HostCache(1000, pin_memory=False)
    for k in "abc":
        assert cache.put(k, delta_of(300))
    assert cache.get("a") is not None  # a becomes most recent: b is now the LRU
    cache.put("d", delta_of(300))  # 1200 > 1000: evict b
    assert cache.keys() == ["c", "a", "d"]
    cache.put("e", delta_of(600))  # needs 600 more: evict c then a
    assert cache.keys() == ["d", "e"]
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.bytes, s.entries, s.budget) == (1, 0, 3, 900, 2, 1000)
    assert cache.get("b") is None and cache.stats().misses == 1


def test_oversize_refresh_and_discard():
    cache = HostCache(1000, pin_memory=False)
    cache.put("a", delta_of(400))
    assert not cache.put("huge", delta_of(2000)), "bigger than the budget: not cached, nothing evicted"
    assert cache.keys() == ["a"]
    cache.put("a", delta_of(800))  # refresh replaces the bytes, not adds
    assert cache.stats().bytes == 800
    cache.discard("a")
    cache.discard("a")
    assert cache.stats().bytes == 0 and "a" not in cache
    with pytest.raises(InvalidArgument):
        HostCache(-1, pin_memory=False)


def test_concurrent_use_keeps_the_byte_count_exact():
    cache = HostCache(10_000, pin_memory=False)

    def work(i):
        for j in range(200):
            k = f"{i}-{j % 13}"
            if cache.get(k) is None:
                cache.put(k, delta_of(400 + 4 * (j % 7)))
            if j % 17 == 0:
                cache.discard(k)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s.hits + s.misses == 4 * 200, "every get counted exactly once"
    assert s.bytes <= s.budget and s.entries == len(cache.keys())
    assert s.bytes == sum(cache.get(k).nbytes() for k in cache.keys())
