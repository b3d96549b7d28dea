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
import uuid
from pathlib import Path
from typing import Callable, Iterator, Protocol, runtime_checkable

from .errors import CorruptBlob, InvalidArgument
from .scratch import owner_of_temp

DIGEST_RE = re.compile(r"[0-9a-f]{64}")


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


class LocalBlobs:
    """Blobs as files on a local (or network) filesystem. ``owner``: the writing store's scratch owner id
    (``delta_store/scratch.py``), carried in temp names so a sweep can tell a live writer's temp file."""

    def __init__(self, root: str | os.PathLike, owner: str = ""):
        self.root = Path(root) / "blobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.owner = owner  # "" until a store sets its own (a temp name then carries no live owner)

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
        tmp = shard / f".{digest}.tmp-{self.owner or os.getpid()}-{uuid.uuid4().hex[:12]}"
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

    def remove_temp(self, alive: Callable[[str], bool]) -> int:
        """Remove every file under the blob root that is not a blob, except the temp files of live writers
        (``alive(owner)``, the owner id in the temp name): interrupted writes, whatever their names."""
        removed = 0
        for entry in list(self.root.iterdir()):
            files = [entry] if not entry.is_dir() else list(entry.iterdir()) if len(entry.name) == 2 else []
            for p in files:
                if DIGEST_RE.fullmatch(p.name) and p.parent != self.root:
                    continue
                owner = owner_of_temp(p.name)
                if owner is not None and alive(owner):
                    continue
                try:
                    p.unlink()
                    removed += 1
                except (FileNotFoundError, IsADirectoryError):
                    continue  # its writer renamed or removed it meanwhile
        return removed
