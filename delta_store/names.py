"""Names of tenants and deltas, and ``name@N`` references.

A name becomes part of log lines, metric-free catalogue rows and (for archives) nothing on disk,
but it is still held to a file-name-safe alphabet so it can never be read as a path: 1-128
characters of ``[A-Za-z0-9._-]``, starting with a letter or digit, never containing ``..``.
"""
from __future__ import annotations

import re

from .errors import InvalidArgument

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_VERSION = (1 << 31) - 1


def check_name(name: object, what: str = "delta name") -> str:
    """Return ``name`` if it is a valid name, else raise :class:`InvalidArgument` naming it."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} must be a string, got {type(name).__name__}")
    if not NAME_RE.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise InvalidArgument(f"{what} {shown!r} is invalid: use 1-128 characters of [A-Za-z0-9._-], "
                              f"starting with a letter or digit, without '..' or path separators")
    return name


def parse_ref(ref: object) -> tuple[str, int | None]:
    """``"name"`` -> (name, None) meaning the latest version; ``"name@N"`` -> (name, N) pinning one."""
    if not isinstance(ref, str):
        raise InvalidArgument(f"delta reference must be a string, got {type(ref).__name__}")
    name, sep, ver = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not ver.isdigit() or not (1 <= int(ver) <= MAX_VERSION) or ver != str(int(ver)):
        raise InvalidArgument(f"delta reference {ref!r}: version after '@' must be a positive integer")
    return name, int(ver)
