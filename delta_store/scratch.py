"""Scratch: every temporary file a store process writes, named so that any process can tell a live writer's
files from a dead one's, and the sweep that removes the dead ones' whatever their names.

Each open store is an *owner* with a random id (``<pid>-<12 hex>``, the pid only for people reading
``ls``). It holds an exclusive ``flock`` on ``<data_dir>/locks/<owner>.lock`` for its whole life; the kernel
drops the lock when the process dies, however it dies (SIGKILL included), and a new process never inherits
an old one's lock even when it gets the same pid (a container restarts its server as pid 1 every time, so
pids say nothing). Owner files:

    <data_dir>/tmp/<owner>.<purpose>-<hex>[suffix]    spooled uploads, extracted archives, links, key files
    <data_dir>/tmp/<owner>.pending-<digest>.<hex>     "this owner is writing blob <digest>, not yet committed"
    <data_dir>/blobs/ab/.<digest>.tmp-<owner>-<hex>    a blob being written (delta_store/blobs.py)

:meth:`Scratch.sweep` removes every entry of ``tmp/`` whose owner is not alive, and every entry that names no
owner at all (files of older versions, ``upload-XXXXXXXX.payload`` spools, anything else): nothing but
owner files is ever written there. A dead owner's ``pending`` markers name blobs that may be orphans; the
store collects them at once (``DeltaStore.recover``) instead of waiting ``orphan_grace_s``. Creating a lock
file and taking its lock are two steps, so a sweeper can see a lock file not yet locked and remove it; the
owner detects that (the path no longer names its inode) and starts again with a new id.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from pathlib import Path

OWNER_RE = re.compile(r"\d+-[0-9a-f]{12}")
_ENTRY_RE = re.compile(rf"(?P<owner>{OWNER_RE.pattern})\.(?P<purpose>[a-z][a-z0-9_]*)-(?P<rest>.+)")
LOCKS_DIR = "locks"
TMP_DIR = "tmp"


class Scratch:
    """This process's scratch area in a data dir; ``close()`` releases the owner lock (the files go first)."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        self.tmp = self.data_dir / TMP_DIR
        self.locks = self.data_dir / LOCKS_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)
        self.owner, self._fd = self._acquire()

    def _acquire(self) -> tuple[str, int]:
        for _ in range(100):
            owner = f"{os.getpid()}-{secrets.token_hex(6)}"
            path = self.locks / f"{owner}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return owner, fd
            except FileNotFoundError:
                pass
            os.close(fd)  # a sweeper removed it between the create and the lock: take another id
        raise RuntimeError(f"could not take an owner lock in {self.locks}")

    def close(self) -> None:
        if self._fd < 0:
            return
        for p in self.tmp.glob(f"{self.owner}.*"):
            _remove(p)
        (self.locks / f"{self.owner}.lock").unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1

    # -- naming -------------------------------------------------------------------------------------
    def path(self, purpose: str, suffix: str = "") -> Path:
        """A fresh path (not created) for a scratch file or folder of this owner."""
        if not re.fullmatch(r"[a-z][a-z0-9_]*", purpose):
            raise ValueError(f"scratch purpose {purpose!r}: lower-case letters, digits and _")
        return self.tmp / f"{self.owner}.{purpose}-{secrets.token_hex(6)}{suffix}"

    def pending(self, digest: str) -> Path:
        """Mark blob ``digest`` as being written by this owner (remove the marker after the commit)."""
        marker = self.tmp / f"{self.owner}.pending-{digest}.{secrets.token_hex(6)}"  # one per put: two puts of
        marker.touch()                                                                 # one digest run at once
        return marker

    # -- liveness -------------------------------------------------------------------------------------
    def alive(self, owner: str) -> bool:
        """Whether ``owner`` (an id from a file name) is an open store, in this process or another."""
        if owner == self.owner:
            return True
        if not OWNER_RE.fullmatch(owner):
            return False
        return owner_alive(self.locks, owner)

    def pending_digests(self) -> set[str]:
        """Blobs live owners are writing right now (not collectable, however old they look)."""
        out = set()
        for p in self.tmp.iterdir():
            m = _ENTRY_RE.fullmatch(p.name)
            if m and m["purpose"] == "pending" and self.alive(m["owner"]):
                out.add(m["rest"].split(".")[0])
        return out

    # -- the sweep ------------------------------------------------------------------------------------
    def sweep(self) -> tuple[int, list[str]]:
        """Remove every ``tmp/`` entry that no live owner holds, and dead owners' lock files.
        Returns (entries removed, digests of blobs that dead owners had pending)."""
        removed, pending = 0, []
        for p in list(self.tmp.iterdir()):
            m = _ENTRY_RE.fullmatch(p.name)
            if m and self.alive(m["owner"]):
                continue
            if m and m["purpose"] == "pending":
                pending.append(m["rest"].split(".")[0])
            removed += _remove(p)
        for lock in list(self.locks.iterdir()):
            owner = lock.name.removesuffix(".lock")
            if lock.name.endswith(".lock") and self.alive(owner):
                continue
            removed += _remove(lock)
        return removed, pending

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def owner_alive(locks_dir: Path, owner: str) -> bool:
    """Whether some process holds ``<locks_dir>/<owner>.lock``; a lock nobody holds is removed."""
    path = Path(locks_dir) / f"{owner}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            raise
        path.unlink(missing_ok=True)  # we hold it, so its owner is gone: remove it under the lock
        return False
    finally:
        os.close(fd)


def live_owners(data_dir: str | os.PathLike) -> list[str]:
    """The owner ids of the stores open on ``data_dir`` right now (any process on this host)."""
    locks = Path(data_dir) / LOCKS_DIR
    if not locks.is_dir():
        return []
    return sorted(p.name.removesuffix(".lock") for p in locks.glob("*.lock")
                  if OWNER_RE.fullmatch(p.name.removesuffix(".lock")) and owner_alive(locks, p.name.removesuffix(".lock")))


def owner_of_temp(name: str) -> str | None:
    """The owner id inside a blob temp name ``.<digest>.tmp-<owner>-<hex>``, if any."""
    m = re.search(rf"\.tmp-({OWNER_RE.pattern})-[0-9a-f]+$", name)
    return m.group(1) if m else None


def _remove(p: Path) -> int:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        return 0
    return 1
