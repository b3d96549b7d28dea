"""Host-memory tier: decoded deltas kept in RAM, LRU by bytes (LoRAX's CPU LRU, S-LoRA's host pool).

Keyed by blob digest, so identical uploads under two names share one entry and a replaced
version (new digest) can never be answered by a stale one. With ``pin_memory`` (the server sets it
when it serves on CUDA) the tensors are moved to pinned (page-locked) memory on insert, which lets the
slot manager's host-to-device copy run asynchronously at full PCIe bandwidth (vLLM PR #31317 pins
adapter memory for the same reason).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from .errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class HostCacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int  # resident bytes
    entries: int
    budget: int


def pin_delta(delta: Delta) -> Delta:
    """A copy of ``delta`` whose tensors live in pinned host memory."""
    def pin(t):
        return None if t is None else t.pin_memory()

    mods = {}
    for path, md in delta.modules.items():
        lora = None if md.lora is None else LoraTerm(pin(md.lora.a), pin(md.lora.b), md.lora.scale)
        ad = md.adapter
        adapter = None if ad is None else AdapterTerm(pin(ad.down), pin(ad.down_bias), pin(ad.up), pin(ad.up_bias),
                                                      ad.activation, ad.scale, ad.source)
        mods[path] = ModuleDelta(lora, pin(md.bias), pin(md.out_scale), pin(md.in_scale), adapter)
    return Delta(mods, delta.source_format, delta.base_fingerprint, delta.description)


class HostCache:
    """Thread-safe LRU of ``digest -> Delta`` bounded by total tensor bytes."""

    def __init__(self, budget_bytes: int, *, pin_memory: bool):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise InvalidArgument(f"host cache budget must be a non-negative integer of bytes, got {budget_bytes!r}")
        self.budget = budget_bytes
        self.pin_memory = bool(pin_memory)
        self._items: OrderedDict[str, tuple[Delta, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Delta | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return item[0]

    def put(self, key: str, delta: Delta) -> bool:
        """Insert (or refresh) ``key``; evicts least-recently-used entries to fit. A delta larger than
        the whole budget is not cached (False): it would evict everything and still not fit."""
        nbytes = delta.nbytes()
        if nbytes > self.budget:
            return False
        if self.pin_memory:
            delta = pin_delta(delta)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._items and self._bytes + nbytes > self.budget:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1
            self._items[key] = (delta, nbytes)
            self._bytes += nbytes
        return True

    def discard(self, key: str) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self._bytes -= item[1]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def stats(self) -> HostCacheStats:
        with self._lock:
            return HostCacheStats(self._hits, self._misses, self._evictions, self._bytes, len(self._items),
                                  self.budget)
