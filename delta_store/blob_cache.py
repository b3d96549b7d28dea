"""BlobCache: a bounded local disk cache of blobs fetched from a remote blob store, one per replica.

A replica that loads a delta from S3 keeps its bytes under ``<root>/ab/abcdef...``, evicting the
least recently used files past ``max_bytes``: the next cold load of that delta (after the host tier
evicted it, or after a restart) reads local disk (~1 GB/s) instead of the network. Entries are named
by digest, so they never go stale; a deleted version's blob is discarded when the store collects it,
and an entry is re-hashed on every read like any blob, so a bad disk shows up as a miss, never as
wrong weights. Writes are temp file + rename (no fsync: losing an entry costs one fetch).
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .blobs import DIGEST_RE


@dataclass(frozen=True, slots=True)
class BlobCacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    rejected: int  # entries that failed their hash on read (removed)


class BlobCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"blob cache max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # digest -> size, least recently used first
        self._bytes = 0
        self._hits = self._misses = self._rejected = 0
        self.root.mkdir(parents=True, exist_ok=True)
        found = []
        for p in self.root.glob("*/*"):
            if DIGEST_RE.fullmatch(p.name):
                st = p.stat()
                found.append((st.st_mtime, p.name, st.st_size))
            elif ".tmp-" in p.name:
                p.unlink(missing_ok=True)  # an interrupted write of an earlier run
        for _mtime, digest, size in sorted(found):
            self._entries[digest] = size
            self._bytes += size
        with self._lock:
            self._evict()

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def get(self, digest: str) -> bytes | None:
        """The blob's bytes if cached and intact, else None."""
        with self._lock:
            known = digest in self._entries
            if known:
                self._entries.move_to_end(digest)
        data = None
        if known:
            try:
                data = self._path(digest).read_bytes()
            except FileNotFoundError:
                data = None
        if data is not None and hashlib.sha256(data).hexdigest() != digest:
            with self._lock:
                self._rejected += 1
            self.discard(digest)
            data = None
        with self._lock:
            if data is None:
                self._misses += 1
            else:
                self._hits += 1
        if data is not None:
            try:
                os.utime(self._path(digest))  # LRU order survives a restart
            except FileNotFoundError:
                pass
        return data

    def put(self, digest: str, data: bytes) -> None:
        """Keep verified bytes (the caller checked the digest); a blob over the budget is not cached."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return
        target = self._path(digest)
        target.parent.mkdir(exist_ok=True)
        tmp = target.parent / f".{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            return  # a full or read-only cache disk costs fetches, not requests
        with self._lock:
            if digest not in self._entries:
                self._entries[digest] = len(data)
                self._bytes += len(data)
            self._evict()

    def discard(self, digest: str) -> None:
        with self._lock:
            size = self._entries.pop(digest, None)
            if size is not None:
                self._bytes -= size
        self._path(digest).unlink(missing_ok=True)

    def _evict(self) -> None:  # under the lock
        while self._bytes > self.max_bytes and self._entries:
            digest, size = self._entries.popitem(last=False)
            self._bytes -= size
            self._path(digest).unlink(missing_ok=True)

    def stats(self) -> BlobCacheStats:
        with self._lock:
            return BlobCacheStats(len(self._entries), self._bytes, self.max_bytes, self._hits, self._misses,
                                  self._rejected)
