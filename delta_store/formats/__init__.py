"""Converters: what PEFT, AdapterHub ``adapters``, OpenDelta and plain BitFit files hold -> canonical Delta.

``convert(path, spec)`` detects the format and converts it, every library rule resolved as
``docs/DELTAS.md`` records it. Anything that cannot be served faithfully is refused with
:class:`UnsupportedDelta` naming the reason; malformed payloads with :class:`DeltaError`. Validation
against the served base and the pools, and the base fingerprint, come after, in the one import path
(``delta_store/importer.py``), with the server's limits.
"""
from __future__ import annotations

from pathlib import Path

from ..base_spec import BaseSpec
from ..delta import Delta
from ..errors import DeltaError
from .detect import FORMATS, detect_format


def convert(path: str | Path, spec: BaseSpec, source_format: str = "auto") -> Delta:
    """Convert without validating (the importer validates with the server's limits)."""
    fmt = detect_format(path) if source_format == "auto" else source_format
    if fmt == "peft":
        from .peft import load_peft
        return load_peft(path, spec)
    if fmt == "adapterhub":
        from .adapterhub import load_adapterhub
        return load_adapterhub(path, spec)
    if fmt == "opendelta":
        from .opendelta import load_opendelta
        return load_opendelta(path, spec)
    if fmt == "bitfit":
        from .bitfit import load_bitfit
        return load_bitfit(path, spec)
    if fmt == "native":
        from ..native import load_native
        return load_native(Path(path))
    raise DeltaError(f"source_format {source_format!r} unknown (one of auto, {', '.join(FORMATS)})")


__all__ = ["FORMATS", "convert", "detect_format"]
