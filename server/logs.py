"""Structured, quiet logs: one line per event, ``key=value`` pairs, level from ``ServerConfig.log_level``.

    ts=2026-11-27T00:31:02.114Z level=info event=listening address=127.0.0.1:50051

Values with spaces or quotes are quoted (``reason="client went away"``), so a line splits on spaces.
"""
from __future__ import annotations

import logging
import sys
import time

_ROOT = "deltaserve"
LEVELS = ("debug", "info", "warning", "error")


def _fmt(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = getattr(record, "fields", {})
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"event={_fmt(record.getMessage())}"]
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items()]
        if record.exc_info and record.levelno >= logging.ERROR:
            parts.append(f"error={_fmt(repr(record.exc_info[1]))}")
        return " ".join(parts)


class EventLogger:
    """``log.info("listening", address=...)``: an event name plus key=value fields."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger

    def _emit(self, level: int, event: str, fields: dict) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields})

    def debug(self, event: str, **fields) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields) -> None:
        self._emit(logging.ERROR, event, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(logging.getLogger(f"{_ROOT}.{name}"))


def configure(level: str = "warning", stream=None) -> None:
    """Route every ``deltaserve.*`` logger to one stderr handler at ``level`` (idempotent)."""
    if level not in LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger(_ROOT)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
