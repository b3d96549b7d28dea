"""Model text and upload progress on the CLI's terminal: control characters shown as escapes, never run."""
from __future__ import annotations

import sys

_KEEP = {"\n", "\t"}


def visible(text: str) -> str:
    """Control characters (C0, DEL, C1) but newline and tab as escapes: ``\\x1b[2J`` is shown, not run."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch not in _KEEP and (code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0):
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


class TextOut:
    """Writes model text to stdout as it streams; made visible on a terminal, as is otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()

    def write(self, text: str) -> None:
        self.stream.write(visible(text) if self.tty else text)
        self.stream.flush()


class Progress:
    """``upload name: [#####.....] 52% 1.3/2.5 MB`` on stderr, redrawn in place on a terminal."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.tty = stream.isatty()

    def update(self, done: int, total: int) -> None:
        total = max(1, total)
        if not self.tty and done < total:
            return
        frac = min(1.0, done / total)
        bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
        end = "\n" if done >= total else ""
        self.stream.write(f"\rupload {self.label}: [{bar}] {frac:4.0%} {done / 1e6:.1f}/{total / 1e6:.1f} MB{end}")
        self.stream.flush()
