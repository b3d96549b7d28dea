"""Content-addressed blob storage: ``<root>/blobs/ab/abcdef...`` named by the sha256 of the bytes.

Writes are atomic and durable: a temp file in the target directory, fsync, rename, fsync of the
directory (POSIX rename is atomic; the directory fsync makes the new name survive a power cut).
A reader therefore sees either no blob or the whole blob, and the catalogue commits a row only
after ``put`` returned. Every ``get`` re-hashes the bytes: a blob altered on disk is refused with
:class:`CorruptBlob`, never served (a few ms per MiB against minutes of wrong answers).

:class:`BlobBackend` is the interface the store needs; an S3-compatible backend implements the
same five calls plus ``mtime`` (``PutObject``, ``GetObject``, ``HeadObject``, ``DeleteObject``,
``ListObjectsV2``) and gets atomicity from the object store itself.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from .errors import CorruptBlob, InvalidArgument

DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise InvalidArgument(f"blob digest {digest!r} is not a sha256 hex string")
    return digest


@runtime_checkable
class BlobBackend(Protocol):
    def put(self, digest: str, data: bytes) -> None: ...
    def get(self, digest: str) -> bytes: ...
    def exists(self, digest: str) -> bool: ...
    def delete(self, digest: str) -> None: ...
    def iter(self) -> Iterator[str]: ...
    def mtime(self, digest: str) -> float: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (temp names carry their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalBlobs:
    """Blobs as files on a local (or network) filesystem."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "blobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.root / digest[:2] / digest

    def put(self, digest: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != _check_digest(digest):
            raise InvalidArgument(f"blob put: bytes do not hash to {digest[:12]}")
        target = self.path(digest)
        if target.exists() and target.stat().st_size == len(data):
            return  # same content, same name: already durable (a corrupt one is caught on get)
        shard = target.parent
        if not shard.exists():
            shard.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        tmp = shard / f".{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(shard)

    def get(self, digest: str) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise CorruptBlob(f"blob {digest[:12]} is missing from {self.root}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CorruptBlob(f"blob {digest[:12]} is corrupt: its bytes hash to {actual[:12]}")
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def delete(self, digest: str) -> None:
        p = self.path(digest)
        try:
            p.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(p.parent)

    def iter(self) -> Iterator[str]:
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for p in sorted(shard.iterdir()):
                if DIGEST_RE.fullmatch(p.name):
                    yield p.name

    def mtime(self, digest: str) -> float:
        return self.path(digest).stat().st_mtime

    def remove_temp(self, grace_s: float) -> int:
        """Remove temp files of interrupted writes: their writer is dead, or they are older than ``grace_s``.

        Temp names carry the writer's pid, so a live writer in another process keeps its file.
        """
        removed = 0
        now = time.time()
        for shard in self.root.iterdir():
            if not shard.is_dir():
                continue
            for p in shard.iterdir():
                m = _TMP_RE.search(p.name)
                if m is None:
                    continue
                try:
                    stale = not pid_alive(int(m.group(1))) or now - p.stat().st_mtime > grace_s
                    if stale:
                        p.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue  # its writer renamed or removed it meanwhile
        return removed
