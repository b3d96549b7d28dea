"""The import path of an upload: a payload file or folder -> a validated canonical :class:`Delta`.

    size check -> native file? (load, check its base)
               -> folder | archive (extracted under scratch, bounded) | lone tensor file (named by its content)
                  -> formats.convert (PEFT, AdapterHub, OpenDelta, BitFit)
    -> validate(spec, limits) -> stamped with the served base's fingerprint

Nothing is stored here: ``DeltaStore.put`` writes the blob and the version row after :meth:`Importer.read`
returns, so a refused upload leaves nothing behind. Scratch folders come from the store's
:class:`~delta_store.scratch.Scratch` (owner-named, swept whatever happens to this process) and are removed
before ``read`` returns. An archive may expand to ``max_archive_ratio`` times its own size (at least
:data:`MIN_EXPANSION_BYTES`), never past ``max_archive_bytes``: disk per upload stays a small multiple of it.
Messages name the payload by its ``label`` (the edge passes ``"upload"``), never by a scratch path.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from .archive import archive_kind, extract_archive
from .base_spec import BaseSpec
from .delta import Delta
from .errors import BaseMismatch, DeltaError, DeltaServeError, InvalidArgument
from .formats import convert
from .native import load_native, sniff_native
from .settings import StoreSettings
from .validate import Limits, validate

LABEL_KEY_CHARS, LABEL_VALUE_CHARS = 128, 1024  # per label; the count is StoreSettings.max_labels
LINK_NAME = "payload"  # a lone spooled file is linked as payload.safetensors / payload.bin for format detection
MIN_EXPANSION_BYTES = 1 << 20  # tar pads to 10 KiB records: an archive of two small configs expands ~30x


class Importer:
    """Turns uploads into Deltas the served base (``spec``) and the pools (``limits``) can take.
    ``scratch``: where extraction folders go (``scratch.path(purpose)`` -> a fresh path), the store's
    :class:`~delta_store.scratch.Scratch`."""

    def __init__(self, spec: BaseSpec, limits: Limits, settings: StoreSettings, scratch):
        self.spec = spec
        self.limits = limits
        self.settings = settings
        self.scratch = scratch

    def read(self, path: str | os.PathLike, source_format: str = "auto", *, label: str | None = None) -> Delta:
        """The validated Delta of ``path``, carrying ``spec.fingerprint``; DeltaError (or a subclass) otherwise.
        ``label`` names the payload in messages (default: its file name)."""
        path = Path(path)
        label = label or path.name
        dest = self.scratch.path("extract")
        try:
            delta = self._decode(path, source_format, dest, label)
            validate(delta, self.spec, self.limits)
        except DeltaServeError as exc:
            shown = _relabel(str(exc), path, dest, label)
            if shown == str(exc):
                raise
            raise type(exc)(shown) from None
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return dataclasses.replace(delta, base_fingerprint=self.spec.fingerprint)

    def extraction_limit(self, archive_bytes: int) -> int:
        """Bytes an archive of ``archive_bytes`` may expand to on disk."""
        s = self.settings
        return min(s.max_archive_bytes, max(MIN_EXPANSION_BYTES, int(s.max_archive_ratio * archive_bytes)))

    def check_meta(self, description: str, labels: dict) -> dict[str, str]:
        """The version's description and labels, within the settings' bounds; a copy of ``labels``."""
        s = self.settings
        if not isinstance(description, str) or len(description) > s.max_description:
            raise InvalidArgument(f"description must be a string of at most {s.max_description} characters")
        if not isinstance(labels, dict) or len(labels) > s.max_labels:
            raise InvalidArgument(f"labels must be a mapping of at most {s.max_labels} pairs")
        for k, v in labels.items():
            if not isinstance(k, str) or not (1 <= len(k) <= LABEL_KEY_CHARS) or not isinstance(v, str) or \
                    len(v) > LABEL_VALUE_CHARS:
                raise InvalidArgument(f"label {str(k)[:40]!r}: keys must be 1-{LABEL_KEY_CHARS} characters and values "
                                      f"strings of at most {LABEL_VALUE_CHARS}")
        return dict(labels)

    def _decode(self, path: Path, source_format: str, dest: Path, label: str) -> Delta:
        if not path.exists():
            raise DeltaError(f"payload {label}: no such file or folder")
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if size > self.settings.max_upload_bytes:
            raise DeltaError(f"payload {label}: {size} bytes is over the {self.settings.max_upload_bytes}-byte "
                             f"upload limit")
        if path.is_file() and source_format in ("auto", "native") and sniff_native(path):
            delta = load_native(path)
            if delta.base_fingerprint and delta.base_fingerprint != self.spec.fingerprint:
                raise BaseMismatch(f"payload {label}: made for base {delta.base_fingerprint[:12]}, this server "
                                   f"serves {self.spec.fingerprint[:12]}")
            return delta
        if source_format == "native":
            raise DeltaError(f"payload {label}: not a native delta file")
        if path.is_dir():
            return convert(path, self.spec, source_format)
        if archive_kind(path) is not None:
            limit = self.extraction_limit(size)
            try:
                folder = extract_archive(path, dest, max_members=self.settings.max_archive_members, max_bytes=limit,
                                         label=label)
            except DeltaError as exc:
                if "expand" in str(exc) and limit < self.settings.max_archive_bytes:
                    raise DeltaError(f"{exc} ({self.settings.max_archive_ratio:g}x the {size}-byte archive: "
                                     f"upload it uncompressed, or as a native file)") from None
                raise
            return convert(folder, self.spec, source_format)
        return convert(_with_suffix(path, dest), self.spec, source_format)


def _relabel(message: str, path: Path, dest: Path, label: str) -> str:
    """``message`` with the server's paths (the extraction folder, the spooled file) replaced by ``label``."""
    links = [(str(dest / f"{LINK_NAME}{suffix}"), label) for suffix in (".safetensors", ".bin")]
    links += [(f"{LINK_NAME}{suffix}", label) for suffix in (".safetensors", ".bin")]
    for long, short in links + [(f"{dest}/", f"{label}:"), (str(dest), label), (str(path), label), (path.name, label)]:
        message = message.replace(long, short)
    return message


def _with_suffix(path: Path, dest: Path) -> Path:
    """A spooled upload has no meaningful name; format detection wants ``.safetensors`` or ``.bin``.
    Link (or copy) it under the suffix its content shows: a safetensors header or a torch zip."""
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return path
    with open(path, "rb") as f:
        head = f.read(8)
    suffix = ".bin" if head[:2] == b"PK" else ".safetensors"  # torch.save writes a zip; else try safetensors
    dest.mkdir(parents=True, exist_ok=True)
    named = dest / f"{LINK_NAME}{suffix}"
    try:
        os.link(path, named)
    except OSError:
        shutil.copyfile(path, named)
    return named
