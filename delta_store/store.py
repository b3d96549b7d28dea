"""DeltaStore: the durable store (catalogue + content-addressed blobs) and the host-memory tier.

``put`` turns an uploaded file (native, BitFit, or an archive of a PEFT / AdapterHub / OpenDelta
folder) into a validated canonical :class:`Delta`, stores it as a native blob and commits an
immutable version row; ``resolve`` maps ``name`` / ``name@N`` to that version; ``load`` returns
the Delta from the host tier or from disk (digest checked). The order blob-durable-then-row (D7)
means a crash at any moment leaves either no version or a complete one; start-up sweeps what an
interrupted writer left behind. Tiers follow LoRAX and S-LoRA (``../shared/ANCHORS.md`` §2):
device slots (``server/slots.py``) -> host LRU by bytes (here) -> disk.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .archive import archive_kind, extract_archive
from .blobs import BlobBackend, LocalBlobs, pid_alive
from .catalogue import Catalogue
from .delta import Delta
from .errors import BaseMismatch, CorruptBlob, DeltaError, DeltaServeError, InvalidArgument, NotFound
from .host_cache import HostCache, HostCacheStats
from .names import check_name, parse_ref
from .native import digest_bytes, dump_native, load_native, sniff_native
from .records import DeltaVersion, Tenant
from .settings import StoreSettings
from .tenants import TenantRegistry
from .validate import validate

_UPLOAD_RE = re.compile(r"upload-(\d+)-[0-9a-f]+$")
_USAGE_FLUSH_S = 1.0  # usage counters reach SQLite at most once a second, not once per request


@dataclass(frozen=True, slots=True)
class StoreStats:
    host: HostCacheStats
    disk_loads: int  # loads that read and verified a blob
    disk_load_seconds: float
    imports: int
    import_seconds: float


class DeltaStore:
    def __init__(self, data_dir: str | os.PathLike, spec, limits, settings: StoreSettings | None = None, *,
                 blobs: BlobBackend | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec  # BaseSpec of the served base
        self.limits = limits  # delta_store.validate.Limits
        self.settings = settings or StoreSettings()
        self.blobs: BlobBackend = blobs if blobs is not None else LocalBlobs(self.data_dir)
        self.catalogue = Catalogue(self.data_dir / "catalogue.sqlite3", busy_timeout_s=self.settings.busy_timeout_s)
        self.host = HostCache(self.settings.host_cache_bytes)
        self.tenants = TenantRegistry(self.catalogue, self.settings.default_quotas, self._deleted)
        self._tmp = self.data_dir / "tmp"
        self._tmp.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._usage: dict[tuple[str, str, int, str], list] = {}
        self._usage_flushed = time.monotonic()
        self._disk_loads = self._imports = 0
        self._disk_seconds = self._import_seconds = 0.0
        self._listeners: list[Callable[[list[DeltaVersion]], None]] = []
        self.recover()

    @classmethod
    def open(cls, data_dir: str | os.PathLike, spec, limits, settings: StoreSettings | None = None,
             **kwargs) -> "DeltaStore":
        return cls(data_dir, spec, limits, settings, **kwargs)

    def __enter__(self) -> "DeltaStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.flush_usage()
        self.catalogue.close()

    # -- housekeeping -------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Start-up sweep: temp files and upload folders of dead writers, queued and orphan blobs."""
        removed = {"temp": 0, "uploads": 0, "blobs": 0}
        if isinstance(self.blobs, LocalBlobs):
            removed["temp"] = self.blobs.remove_temp(self.settings.temp_grace_s)
        now = time.time()
        for p in self._tmp.iterdir():
            m = _UPLOAD_RE.fullmatch(p.name)
            if m and (not pid_alive(int(m.group(1))) or now - p.stat().st_mtime > self.settings.temp_grace_s):
                shutil.rmtree(p, ignore_errors=True)
                removed["uploads"] += 1
        for digest in self.catalogue.gc_queue():
            removed["blobs"] += self.catalogue.collect(digest, self.blobs.delete)
        referenced = self.catalogue.referenced_digests()
        for digest in list(self.blobs.iter()):
            if digest in referenced:
                continue
            try:
                old = now - self.blobs.mtime(digest) > self.settings.orphan_grace_s
            except FileNotFoundError:
                continue
            if old:
                removed["blobs"] += self.catalogue.collect(digest, self.blobs.delete)
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
    def put(self, tenant: Tenant | str, name: str, payload_path: str | os.PathLike, source_format: str = "auto",
            description: str = "", labels: dict[str, str] | None = None) -> DeltaVersion:
        """Import, validate and store a new immutable version of ``name``; nothing is stored on error."""
        t0 = time.perf_counter()
        tid = self.tenants.get(_tid(tenant)).id
        check_name(name)
        labels = self._check_meta(description, labels or {})
        path = Path(payload_path)
        delta = self._import(path, source_format)
        validate(delta, self.spec, self.limits)
        delta = dataclasses.replace(delta, base_fingerprint=self.spec.fingerprint)
        data = dump_native(delta)
        digest = digest_bytes(data)
        self.blobs.put(digest, data)

        def ensure_blob() -> None:  # under the catalogue write lock: a concurrent collection may have run
            if not self.blobs.exists(digest):
                self.blobs.put(digest, data)

        version = self.catalogue.add_version(tid, name, digest, len(data), sorted(delta.kinds()), delta.max_rank,
                                             delta.max_width, delta.source_format, description, labels, ensure_blob)
        self.host.put(digest, delta)  # used the moment the upload returns: keep it warm
        with self._lock:
            self._imports += 1
            self._import_seconds += time.perf_counter() - t0
        return version

    def _check_meta(self, description: str, labels: dict) -> dict[str, str]:
        s = self.settings
        if not isinstance(description, str) or len(description) > s.max_description:
            raise InvalidArgument(f"description must be a string of at most {s.max_description} characters")
        if not isinstance(labels, dict) or len(labels) > s.max_labels:
            raise InvalidArgument(f"labels must be a mapping of at most {s.max_labels} pairs")
        for k, v in labels.items():
            if not isinstance(k, str) or not (1 <= len(k) <= 128) or not isinstance(v, str) or len(v) > 1024:
                raise InvalidArgument(f"label {str(k)[:40]!r}: keys must be 1-128 characters and values "
                                      f"strings of at most 1024")
        return dict(labels)

    def _import(self, path: Path, source_format: str) -> Delta:
        if not path.exists():
            raise DeltaError(f"payload {path}: no such file or folder")
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if size > self.settings.max_upload_bytes:
            raise DeltaError(f"payload {path.name}: {size} bytes is over the {self.settings.max_upload_bytes}-byte "
                             f"upload limit")
        if path.is_file() and source_format in ("auto", "native") and sniff_native(path):
            delta = load_native(path)
            if delta.base_fingerprint and delta.base_fingerprint != self.spec.fingerprint:
                raise BaseMismatch(f"payload {path.name}: made for base {delta.base_fingerprint[:12]}, this server "
                                   f"serves {self.spec.fingerprint[:12]}")
            return delta
        if source_format == "native":
            raise DeltaError(f"payload {path.name}: not a native delta file")
        if path.is_dir():
            return _convert(path, self.spec, source_format)
        dest = self._tmp / f"upload-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            if archive_kind(path) is not None:
                folder = extract_archive(path, dest, max_members=self.settings.max_archive_members,
                                         max_bytes=self.settings.max_archive_bytes)
                return _convert(folder, self.spec, source_format)
            return _convert(_with_suffix(path, dest), self.spec, source_format)
        except DeltaServeError as exc:  # name the upload, not the server's scratch folder
            shown = str(exc).replace(f"{dest}/", f"{path.name}:").replace(str(dest), path.name)
            if shown == str(exc):
                raise
            raise type(exc)(shown) from None
        finally:
            shutil.rmtree(dest, ignore_errors=True)

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

    def load_key(self, key) -> Delta:
        """For the slot manager: a ``DeltaKey``'s Delta; NotFound once the version is deleted."""
        if not self.catalogue.exists(key.tenant, key.name, key.version, key.digest):
            raise NotFound(f"delta {key.name}@{key.version} not found (deleted or replaced)")
        return self._load_digest(key.digest)

    def _load_digest(self, digest: str) -> Delta:
        delta = self.host.get(digest)
        if delta is not None:
            return delta
        t0 = time.perf_counter()
        data = self.blobs.get(digest)
        try:
            delta = load_native(data)
        except DeltaError as exc:  # the bytes hash right but do not parse: written by a broken build
            raise CorruptBlob(f"blob {digest[:12]} does not parse: {exc}") from None
        self.host.put(digest, delta)
        with self._lock:
            self._disk_loads += 1
            self._disk_seconds += time.perf_counter() - t0
        return delta

    def record_usage(self, key, requests: int = 1, tokens: int = 0) -> None:
        """Count requests/tokens served by a version; buffered, flushed about once a second."""
        k = (key.tenant, key.name, key.version, key.digest)
        with self._lock:
            entry = self._usage.setdefault(k, [0, 0, 0.0])
            entry[0] += requests
            entry[1] += tokens
            entry[2] = time.time()
            due = time.monotonic() - self._usage_flushed >= _USAGE_FLUSH_S
        if due:
            self.flush_usage()

    def flush_usage(self) -> None:
        with self._lock:
            pending, self._usage = self._usage, {}
            self._usage_flushed = time.monotonic()
        if pending:
            self.catalogue.add_usage({k: tuple(v) for k, v in pending.items()})

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self.host.stats(), self._disk_loads, self._disk_seconds, self._imports,
                              self._import_seconds)


def _tid(tenant: Tenant | str) -> str:
    return tenant.id if isinstance(tenant, Tenant) else tenant


def _with_suffix(path: Path, dest: Path) -> Path:
    """A spooled upload has no meaningful name; format detection wants ``.safetensors`` or ``.bin``.
    Link (or copy) it under the suffix its content shows: a safetensors header or a torch zip."""
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return path
    with open(path, "rb") as f:
        head = f.read(8)
    suffix = ".bin" if head[:2] == b"PK" else ".safetensors"  # torch.save writes a zip; else try safetensors
    dest.mkdir(parents=True, exist_ok=True)
    named = dest / f"payload{suffix}"
    try:
        os.link(path, named)
    except OSError:
        shutil.copyfile(path, named)
    return named


def _convert(path: Path, spec, source_format: str) -> Delta:
    # the formats engineer's converters (PEFT, AdapterHub, OpenDelta, BitFit); the store validates
    # once, with its own limits, after conversion
    from .formats import convert

    return convert(path, spec, source_format)
