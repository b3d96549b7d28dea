"""Local servers leave a note of their data dir, so client commands on the same machine find its admin key.

    <runtime dir>/port-<port>.json  = {"pid", "address", "data_dir", "openai"}

The runtime dir is ``$XDG_RUNTIME_DIR/deltaserve`` (else ``/tmp/deltaserve-<uid>``), mode 0700: only the
user who runs the server reads it. The note holds where the data dir is, never the key itself; the
admin key file stays 0600 in the data dir. A note whose process is gone is ignored (and removed).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "deltaserve" if base else Path(tempfile.gettempdir()) / f"deltaserve-{os.getuid()}"


def note_path(port: int) -> Path:
    return runtime_dir() / f"port-{int(port)}.json"


def announce(port: int, address: str, data_dir: str | os.PathLike, openai: str = "") -> Path | None:
    """Write the note of a server listening on ``port``; None when the runtime dir is not writable."""
    try:
        folder = runtime_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = note_path(port)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "address": address,
                                   "data_dir": str(Path(data_dir).resolve()), "openai": openai}))
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def withdraw(path: Path | None) -> None:
    if path is not None:
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass


def data_dir_of(port: int) -> Path | None:
    """The data dir of the live local server on ``port``, if it left a note."""
    path = note_path(port)
    try:
        note = json.loads(path.read_text())
        pid = int(note["pid"])
        os.kill(pid, 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        try:
            path.unlink()
        except OSError:
            pass
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(note["data_dir"])
