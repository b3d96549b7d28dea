"""MergeCache: per-request linear merges of a tenant's LoRA deltas, built once and served like any delta.

A ``GenerateRequest.merge`` names parts ``(name, weight)``; the edge resolves them in the caller's namespace
(another tenant's name is NOT_FOUND, as anywhere), refuses non-mergeable kinds from the catalogue's kinds
with the reason (``delta_store.merge.unmergeable_reason``), and asks here for the merged delta's key::

    key = DeltaKey(tenant, "merge:" + digest[:16], 0, digest),  digest = merge_digest([(part digest, weight)])

The digest covers the parts' blob digests and weights, so a re-uploaded part is a new key (the slot
manager never serves a stale merge) and the same recipe from any request reuses one build and one slot.
``ensure`` builds the merged ``Delta`` (``delta_store.merge.merge_lora``: ranks concatenated, weights folded
into A) once, off the event loop; ``load`` is the slot manager's loader for merge keys, rebuilding from the
recipe when the built delta was dropped from this cache (LRU by bytes). A deleted part drops every
merge that used it (``forget``), and the app invalidates their slots.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from delta_store.delta import Delta
from delta_store.errors import DeltaError
from delta_store.merge import merge_lora
from delta_store.merge_rules import merge_digest
from delta_store.records import DeltaKey

MERGE_PREFIX = "merge:"
MAX_RECIPES = 4096  # recipes are a few hundred bytes each; built deltas are bounded by bytes instead


@dataclass(frozen=True, slots=True)
class MergedVersion:
    """What the edge holds for a merged request, in place of a catalogue ``DeltaVersion``."""

    key: DeltaKey
    parts: tuple[tuple[DeltaKey, float], ...]  # (part key, weight), in request order
    names: tuple[str, ...]  # the parts as the caller named them
    kinds: tuple[str, ...] = ("lora",)
    version: int = 0


def is_merge(key: DeltaKey) -> bool:
    return key.name.startswith(MERGE_PREFIX)


class MergeCache:
    def __init__(self, load_part: Callable[[DeltaKey], Delta], *, max_rank: int, max_bytes: int):
        self.load_part = load_part
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self._recipes: OrderedDict[DeltaKey, MergedVersion] = OrderedDict()
        self._built: OrderedDict[DeltaKey, Delta] = OrderedDict()
        self._bytes = 0
        self._builds = 0
        self._lock = threading.RLock()

    def recipe(self, versions: Sequence, weights: Sequence[float], names: Sequence[str]) -> MergedVersion:
        """The merged delta's identity for these catalogue versions and weights (registered for ``load``)."""
        digest = merge_digest([(v.digest, w) for v, w in zip(versions, weights)])
        key = DeltaKey(versions[0].tenant, MERGE_PREFIX + digest[:16], 0, digest)
        merged = MergedVersion(key, tuple((v.key, float(w)) for v, w in zip(versions, weights)), tuple(names))
        with self._lock:
            self._recipes[key] = merged
            self._recipes.move_to_end(key)
            while len(self._recipes) > MAX_RECIPES:
                old, _ = self._recipes.popitem(last=False)
                self._drop(old)
        return merged

    def ensure(self, merged: MergedVersion) -> Delta:
        """The merged Delta, built now if not cached; DeltaError if the parts cannot be merged exactly."""
        with self._lock:
            delta = self._built.get(merged.key)
            if delta is not None:
                self._built.move_to_end(merged.key)
                return delta
        parts = [(self.load_part(k), w) for k, w in merged.parts]  # host tier or disk, digest checked
        delta = merge_lora(parts, names=merged.names, max_rank=self.max_rank)
        with self._lock:
            self._builds += 1
            if merged.key not in self._built:
                self._built[merged.key] = delta
                self._bytes += delta.nbytes()
                while self._bytes > self.max_bytes and len(self._built) > 1:
                    old, _ = next(iter(self._built.items()))
                    self._drop_built(old)
        return delta

    def load(self, key: DeltaKey) -> Delta:
        """The slot manager's loader for a merge key (rebuilds from the recipe if the build was dropped)."""
        with self._lock:
            merged = self._recipes.get(key)
        if merged is None:
            raise DeltaError(f"merged delta {key.name} is no longer known (a part was deleted); send the merge again")
        return self.ensure(merged)

    def forget(self, part: DeltaKey) -> list[DeltaKey]:
        """Drop every merge that uses ``part`` (a deleted version); returns their keys."""
        with self._lock:
            gone = [k for k, m in self._recipes.items() if any(p == part for p, _ in m.parts)]
            for k in gone:
                self._recipes.pop(k, None)
                self._drop(k)
        return gone

    @property
    def builds(self) -> int:
        """Merged deltas built so far (a recipe served again from the cache builds nothing)."""
        return self._builds

    def __len__(self) -> int:
        """Recipes known (each a merge some request asked for and no deletion has dropped)."""
        with self._lock:
            return len(self._recipes)

    def _drop(self, key: DeltaKey) -> None:
        if key in self._built:
            self._drop_built(key)

    def _drop_built(self, key: DeltaKey) -> None:
        self._bytes -= self._built.pop(key).nbytes()


def loader(merges: MergeCache, load: Callable[[DeltaKey], Delta]) -> Callable[[DeltaKey], Delta]:
    """The slot manager's loader: merge keys from ``merges``, every other key from ``load`` (the store)."""
    return lambda key: merges.load(key) if is_merge(key) else load(key)
