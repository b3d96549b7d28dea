"""Safe extraction of uploaded archives (tar, tar.gz, tar.bz2, tar.xz, zip) holding an adapter folder.

Every member is checked before anything is written: no absolute paths, no ``..`` components,
no links, devices or FIFOs, at most ``max_members`` members and ``max_bytes`` in total (the
declared sizes, and again while copying, so a lying header cannot overrun the limit). Members
are copied by hand into ``dest`` instead of ``extractall`` so that nothing but regular files and
directories can ever be created (CVE-2007-4559 and its zip-slip cousins). The caller sizes
``max_bytes`` from the archive itself (the importer: ``max_archive_ratio`` times its size, within
``max_archive_bytes``), so a 1.5 MB zip bomb stops after a few MB, not 1.5 GiB.

Integrity: a compressed tar is read to the end of its stream after the last member, so the gzip /
bzip2 / xz checksum and length trailer are checked (tarfile alone stops at the end-of-archive block
and would take a bit-flipped or cut archive as good); zip members are CRC-checked as they are read.
Every decoder error is a :class:`DeltaError` naming the archive, never an internal error.
"""
from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import DeltaError

_COPY_CHUNK = 1 << 20
# What a corrupt archive raises from the readers and the decompressors underneath them.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError,
            UnicodeDecodeError, NotImplementedError)


def archive_kind(path: str | os.PathLike) -> str | None:
    """``"zip"``, ``"tar"`` or None (not an archive we open). Zip first: a zip never parses as tar."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                if any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist()):
                    return None  # a torch.save checkpoint (zip container), i.e. a weights file
        except (zipfile.BadZipFile, OSError):
            return None
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError, EOFError):
        return None
    return None


def _safe_relpath(name: str, where: str) -> PurePosixPath | None:
    """The member's relative path, or None for the archive root itself; refuses escapes."""
    if "\\" in name or "\x00" in name:
        raise DeltaError(f"{where}: member {name!r} has a backslash or NUL in its name")
    p = PurePosixPath(name)
    if p.is_absolute() or (p.parts and p.parts[0].endswith(":")):
        raise DeltaError(f"{where}: member {name!r} has an absolute path")
    parts = [part for part in p.parts if part not in ("", ".")]
    if ".." in parts:
        raise DeltaError(f"{where}: member {name!r} escapes the archive with '..'")
    return PurePosixPath(*parts) if parts else None


def _copy(src, dst: Path, budget: int, where: str, name: str) -> int:
    """Copy at most ``budget`` bytes; more means the declared size lied."""
    written = 0
    with open(dst, "xb") as out:
        while chunk := src.read(_COPY_CHUNK):
            written += len(chunk)
            if written > budget:
                raise DeltaError(f"{where}: member {name!r} expands past the {budget}-byte extraction limit")
            out.write(chunk)
    return written


def extract_archive(path: str | os.PathLike, dest: str | os.PathLike, *, max_members: int, max_bytes: int,
                    label: str | None = None) -> Path:
    """Extract the archive at ``path`` into the empty directory ``dest``; return the adapter folder.

    The adapter folder is ``dest`` itself, or its only top-level directory when the archive wraps
    the files in one (``tar czf a.tgz my_adapter/``), which is how people usually pack them.
    ``label`` names the archive in messages (default: its file name; a spooled upload's is meaningless).
    """
    where = f"archive {label or Path(path).name}"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    kind = archive_kind(path)
    try:
        if kind == "zip":
            _extract_zip(path, dest, max_members, max_bytes, where)
        elif kind == "tar":
            _extract_tar(path, dest, max_members, max_bytes, where)
        else:
            raise DeltaError(f"{where}: not a tar or zip archive")
    except DeltaError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except _CORRUPT as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DeltaError(f"{where}: corrupt or truncated archive ({_first_line(exc)})") from None
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _extract_tar(path, dest: Path, max_members: int, max_bytes: int, where: str) -> None:
    plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    total = 0
    with tarfile.open(path, mode="r:*") as tar:
        for member in tar:  # streams: a million-member bomb stops at max_members + 1
            if len(plan) >= max_members:
                raise DeltaError(f"{where}: more than {max_members} members")
            rel = _safe_relpath(member.name, where)
            if not (member.isreg() or member.isdir()):
                what = "link" if (member.issym() or member.islnk()) else "device, FIFO or special file"
                raise DeltaError(f"{where}: member {member.name!r} is a {what}; only files and folders are allowed")
            total += member.size if member.isreg() else 0
            if total > max_bytes:
                raise DeltaError(f"{where}: members expand to more than {max_bytes} bytes")
            if rel is not None:
                plan.append((member, rel))
        left = max_bytes
        for member, rel in plan:
            target = dest.joinpath(*rel.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None  # regular files always have data
            left -= _copy(src, target, left, where, member.name)
        _read_to_end(tar.fileobj)


def _read_to_end(stream) -> None:
    """Decompress what follows the end-of-archive block: the decompressor checks its CRC and length
    trailer only when it reaches them, and raises on a corrupt or cut stream (a plain tar just ends)."""
    while stream.read(_COPY_CHUNK):
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _extract_zip(path, dest: Path, max_members: int, max_bytes: int, where: str) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise DeltaError(f"{where}: {len(infos)} members, more than {max_members}")
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        total = 0
        for info in infos:
            rel = _safe_relpath(info.filename, where)
            ftype = stat.S_IFMT(info.external_attr >> 16)  # 0 when the packer stored no Unix type
            if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
                raise DeltaError(f"{where}: member {info.filename!r} is a link or special file")
            total += info.file_size
            if total > max_bytes:
                raise DeltaError(f"{where}: members expand to more than {max_bytes} bytes")
            if rel is not None:
                plan.append((info, rel))
        left = max_bytes
        for info, rel in plan:
            target = dest.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                left -= _copy(src, target, left, where, info.filename)
