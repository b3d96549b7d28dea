"""DeltaStore: the durable store (catalogue + content-addressed blobs) and the host-memory tier.

``put`` has the :class:`~delta_store.importer.Importer` turn an uploaded file (native, BitFit, or an
archive of a PEFT / AdapterHub / OpenDelta folder) into a validated canonical :class:`Delta`, stores it
as a native blob and commits an immutable version row; ``resolve`` maps ``name`` / ``name@N`` to that
version; ``load`` returns the Delta from the host tier or from disk (digest checked). The order
blob-durable-then-row (D7) means a crash at any moment leaves either no version or a complete one;
start-up sweeps what an interrupted writer left behind: every scratch file of a dead writer whatever its
name (``delta_store/scratch.py``), and the blobs it had marked pending. Quotas are checked before the
payload is read (``check_upload``) and again before the first blob byte is written, so a refused upload
leaves nothing on disk. Tiers as in S-LoRA and LoRAX (a fixed device
pool, a host-memory LRU, disk): device slots (``server/deltas/slots.py``) -> host LRU by bytes (here)
-> disk.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .blobs import BlobBackend, LocalBlobs
from .catalogue import Catalogue
from .delta import Delta
from .errors import CorruptBlob, DeltaError, DeltaServeError, InvalidArgument, NotFound, Unavailable
from .host_cache import HostCache, HostCacheStats
from .importer import Importer
from .names import check_name, parse_ref
from .native import digest_bytes, dump_native, load_native
from .records import DeltaKey, DeltaVersion, Tenant
from .scratch import Scratch
from .settings import StoreSettings
from .tenants import TenantRegistry

_USAGE_FLUSH_S = 1.0  # usage counters reach the catalogue at most once a second, not once per request
# A blob found missing or corrupt is refused from memory for this long before its store is asked again:
# its requests fail at once instead of each paying a fetch, and a restored blob serves within a minute.
DAMAGED_RECHECK_S = 60.0


@dataclass(frozen=True, slots=True)
class StoreStats:
    host: HostCacheStats
    disk_loads: int  # loads that read and verified a blob
    disk_load_seconds: float
    imports: int
    import_seconds: float
    damaged: int = 0  # blobs this process found missing or corrupt (refused until re-checked)


class DeltaStore:
    def __init__(self, data_dir: str | os.PathLike, spec, limits, settings: StoreSettings, *,
                 blobs: BlobBackend | None = None, catalogue: Catalogue | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec  # BaseSpec of the served base
        self.limits = limits  # delta_store.validate.Limits
        self.settings = settings
        self.scratch = Scratch(self.data_dir)  # this process's owner lock and tmp/ names
        self.blobs: BlobBackend = blobs if blobs is not None else LocalBlobs(self.data_dir)
        if isinstance(self.blobs, LocalBlobs) and not self.blobs.owner:
            self.blobs.owner = self.scratch.owner  # blob temp names carry it, so a sweep can see we live
        self.catalogue = catalogue if catalogue is not None else Catalogue(self.data_dir / "catalogue.sqlite3",
                                                                           busy_timeout_s=self.settings.busy_timeout_s)
        self.host = HostCache(self.settings.host_cache_bytes, pin_memory=self.settings.pin_host_memory)
        self.tenants = TenantRegistry(self.catalogue, self.settings.default_quotas, self._deleted)
        self.importer = Importer(spec, limits, self.settings, self.scratch)
        self._lock = threading.Lock()
        self._usage: dict[tuple[str, str, int, str], list] = {}
        self._usage_flushed = time.monotonic()
        self._disk_loads = self._imports = 0
        self._disk_seconds = self._import_seconds = 0.0
        self._listeners: list[Callable[[list[DeltaVersion]], None]] = []
        self._damaged: dict[str, tuple[str, float]] = {}  # digest -> (why, when found): see DAMAGED_RECHECK_S
        self.recover()

    @classmethod
    def open(cls, data_dir: str | os.PathLike, spec, limits, settings: StoreSettings, **kwargs) -> "DeltaStore":
        return cls(data_dir, spec, limits, settings, **kwargs)

    def __enter__(self) -> "DeltaStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.flush_usage()
        except Unavailable:  # shutting down with the catalogue unreachable: the last second's counters are lost
            pass
        finally:
            self.catalogue.close()
            self.scratch.close()

    # -- housekeeping -------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Start-up sweep: every scratch file of a dead writer, the blobs dead writers left uncommitted,
        queued and orphan blobs, stale S3 multipart uploads; then parameter counts rows from before
        catalogue revision 0002 lack."""
        removed = {"temp": 0, "scratch": 0, "blobs": 0}
        removed["scratch"], dead_pending = self.scratch.sweep()
        if isinstance(self.blobs, LocalBlobs):
            removed["temp"] = self.blobs.remove_temp(self.scratch.alive)
        elif hasattr(self.blobs, "abort_stale_uploads"):  # S3: multipart uploads of writers on any replica
            removed["temp"] = self.blobs.abort_stale_uploads(self.settings.temp_grace_s)
        for digest in sorted(set(dead_pending)) + self.catalogue.gc_queue():
            removed["blobs"] += self.catalogue.collect(digest, self.blobs.delete)
        referenced = self.catalogue.referenced_digests()
        in_flight = self.scratch.pending_digests()  # live writers in other processes, mid-put
        now = time.time()
        for digest in list(self.blobs.iter()):
            if digest in referenced or digest in in_flight:
                continue
            try:
                old = now - self.blobs.mtime(digest) > self.settings.orphan_grace_s
            except FileNotFoundError:
                continue
            if old:
                removed["blobs"] += self.catalogue.collect(digest, self.blobs.delete)
        for digest in self.catalogue.digests_without_parameter_count():
            try:
                self.catalogue.set_parameter_count(digest, load_native(self.blobs.get(digest)).num_parameters())
            except DeltaServeError:  # damaged (verify() reports it) or the store unreachable: unknown (0) for now
                continue
        return removed

    def verify(self) -> list[str]:
        """Re-read every referenced blob; one line per problem (empty = consistent)."""
        problems = []
        for digest in sorted(self.catalogue.referenced_digests()):
            try:
                load_native(self.blobs.get(digest))
            except (CorruptBlob, DeltaError) as exc:
                problems.append(f"{digest[:12]}: {exc}")
        return problems

    def _collect(self, digests: list[str]) -> None:
        for digest in digests:
            if self.catalogue.collect(digest, self.blobs.delete):
                self.host.discard(digest)

    def _deleted(self, gone: list[DeltaVersion]) -> None:
        self._collect(sorted({v.digest for v in gone}))
        if gone:
            for fn in self._listeners:
                fn(gone)

    def subscribe(self, fn: Callable[[list[DeltaVersion]], None]) -> None:
        """``fn(versions)`` after versions are deleted (the engine drops their device slots)."""
        self._listeners.append(fn)

    # -- imports ------------------------------------------------------------------------------------
    def check_upload(self, tenant: Tenant | str, name: str, description: str = "",
                     labels: dict[str, str] | None = None) -> dict[str, str]:
        """Everything about an upload that is known before its payload: the name, description and labels,
        and the tenant's quotas (a new name within max_deltas, room for one more byte). Returns the labels."""
        tid = self.tenants.get(_tid(tenant)).id
        check_name(name)
        labels = self.importer.check_meta(description, labels or {})
        self.catalogue.check_quota(tid, name)
        return labels

    def check_quota(self, tenant: Tenant | str, name: str, size: int = 0) -> None:
        """ResourceExhausted if a new ``size``-byte version of ``name`` would break the tenant's quotas now."""
        self.catalogue.check_quota(_tid(tenant), name, size)

    def put(self, tenant: Tenant | str, name: str, payload_path: str | os.PathLike, source_format: str = "auto",
            description: str = "", labels: dict[str, str] | None = None, *, label: str | None = None) -> DeltaVersion:
        """Import, validate and store a new immutable version of ``name``; nothing is stored on error.
        ``label`` names the payload in error messages (default: its file name)."""
        t0 = time.perf_counter()
        tid = self.tenants.get(_tid(tenant)).id
        labels = self.check_upload(tid, name, description, labels)
        delta = self.importer.read(Path(payload_path), source_format, label=label)
        data = dump_native(delta)
        digest = digest_bytes(data)
        self.catalogue.check_quota(tid, name, len(data))  # before the first blob byte is written

        def ensure_blob() -> None:  # under the catalogue write lock: a concurrent collection may have run
            if not self.blobs.exists(digest):
                self.blobs.put(digest, data)

        pending = self.scratch.pending(digest)  # a crash from here on: the sweep collects the blob at once
        try:
            self.blobs.put(digest, data)
            version = self.catalogue.add_version(tid, name, digest, len(data), sorted(delta.kinds()),
                                                 delta.max_rank, delta.max_width, delta.source_format, description,
                                                 labels, ensure_blob, num_parameters=delta.num_parameters())
        except BaseException:
            try:  # refused at commit (a quota raced us, ...): no blob without a row stays behind
                self._collect([digest])
            except Exception:  # noqa: BLE001 - the first error is the one to report; the sweep retries
                pass
            raise
        finally:
            pending.unlink(missing_ok=True)
        self.host.put(digest, delta)  # used the moment the upload returns: keep it warm
        with self._lock:
            self._imports += 1
            self._import_seconds += time.perf_counter() - t0
        return version

    # -- lookups ------------------------------------------------------------------------------------
    def resolve(self, tenant: Tenant | str, ref: str) -> DeltaVersion:
        """``name`` -> latest version, ``name@N`` -> that version. Another tenant's name is NotFound."""
        name, version = parse_ref(ref)
        found = self.catalogue.resolve(_tid(tenant), name, version)
        if found is None:
            raise NotFound(f"delta {ref!r} not found")
        return found

    def get(self, tenant: Tenant | str, ref: str) -> DeltaVersion:
        """Like :meth:`resolve`, with usage counters up to date (for the delta service)."""
        self.flush_usage()
        return self.resolve(tenant, ref)

    def versions(self, tenant: Tenant | str, name: str) -> list[DeltaVersion]:
        self.flush_usage()
        found = self.catalogue.versions(_tid(tenant), check_name(name))
        if not found:
            raise NotFound(f"delta {name!r} not found")
        return found

    def list(self, tenant: Tenant | str, page_size: int = 100, page_token: str = "") -> tuple[list[DeltaVersion], str]:
        """Latest version of each delta, by name; ``page_token`` is the previous page's last name."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not (1 <= page_size <= 1000):
            raise InvalidArgument(f"page_size must be in [1, 1000], got {page_size!r}")
        if page_token:
            check_name(page_token, "page_token")
        self.flush_usage()
        items = self.catalogue.list_latest(_tid(tenant), page_token, page_size + 1)
        more = len(items) > page_size
        items = items[:page_size]
        return items, (items[-1].name if more else "")

    def delete(self, tenant: Tenant | str, ref: str) -> list[DeltaVersion]:
        """Delete every version of ``name`` (or only ``name@N``); blobs go when nothing references them."""
        name, version = parse_ref(ref)
        gone = self.catalogue.delete(_tid(tenant), name, version)
        if not gone:
            raise NotFound(f"delta {ref!r} not found")
        self._deleted(gone)
        return gone

    # -- loads and usage ------------------------------------------------------------------------------
    def load(self, version: DeltaVersion) -> Delta:
        """The version's Delta: from the host tier, else from its blob (digest verified)."""
        return self._load_digest(version.digest)

    def load_key(self, key: DeltaKey) -> Delta:
        """For the slot manager: a ``DeltaKey``'s Delta; NotFound once the version is deleted."""
        if not self.catalogue.exists(key.tenant, key.name, key.version, key.digest):
            raise NotFound(f"delta {key.name}@{key.version} not found (deleted or replaced)")
        try:
            return self._load_digest(key.digest)
        except CorruptBlob as exc:  # name the delta, not only its blob
            raise CorruptBlob(f"delta {key.name}@{key.version} cannot be served: {exc}") from None

    def damaged(self) -> dict[str, str]:
        """Blobs this process found missing or corrupt, digest -> what was wrong (until re-checked)."""
        with self._lock:
            return {d: message for d, (message, _t) in self._damaged.items()}

    def _load_digest(self, digest: str) -> Delta:
        delta = self.host.get(digest)
        if delta is not None:
            return delta
        with self._lock:
            marked = self._damaged.get(digest)
        if marked is not None and time.monotonic() - marked[1] < DAMAGED_RECHECK_S:
            raise CorruptBlob(marked[0])
        t0 = time.perf_counter()
        try:
            data = self.blobs.get(digest)
            try:
                delta = load_native(data)
            except DeltaError as exc:  # the bytes hash right but do not parse: written by a broken build
                raise CorruptBlob(f"blob {digest[:12]} does not parse: {exc}") from None
        except CorruptBlob as exc:
            with self._lock:
                self._damaged[digest] = (str(exc), time.monotonic())
            raise
        with self._lock:
            self._damaged.pop(digest, None)
        self.host.put(digest, delta)
        with self._lock:
            self._disk_loads += 1
            self._disk_seconds += time.perf_counter() - t0
        return delta

    def record_usage(self, key: DeltaKey, requests: int = 1, tokens: int = 0) -> None:
        """Count requests/tokens served by a version; buffered, flushed about once a second."""
        k = (key.tenant, key.name, key.version, key.digest)
        with self._lock:
            entry = self._usage.setdefault(k, [0, 0, 0.0])
            entry[0] += requests
            entry[1] += tokens
            entry[2] = time.time()
            due = time.monotonic() - self._usage_flushed >= _USAGE_FLUSH_S
        if due:
            try:
                self.flush_usage()
            except Unavailable:  # the catalogue is down: the counters wait for a later flush, the request is fine
                pass

    def flush_usage(self) -> None:
        """Write the buffered counters; if the catalogue cannot take them they stay buffered (and it raises)."""
        with self._lock:
            pending, self._usage = self._usage, {}
            self._usage_flushed = time.monotonic()
        if not pending:
            return
        try:
            self.catalogue.add_usage({k: tuple(v) for k, v in pending.items()})
        except Unavailable:
            with self._lock:
                for k, (requests, tokens, last) in pending.items():
                    entry = self._usage.setdefault(k, [0, 0, 0.0])
                    entry[0] += requests
                    entry[1] += tokens
                    entry[2] = max(entry[2], last)
            raise

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self.host.stats(), self._disk_loads, self._disk_seconds, self._imports,
                              self._import_seconds, len(self._damaged))


def _tid(tenant: Tenant | str) -> str:
    return tenant.id if isinstance(tenant, Tenant) else tenant
