"""Importers: what PEFT, AdapterHub ``adapters``, OpenDelta and plain BitFit files hold -> canonical Delta.

``load_delta(path, spec)`` detects the format, converts it (every library rule resolved, see
``../shared/DELTAS.md``), validates the result against the served base and stamps it with the
base's fingerprint. Anything that cannot be served faithfully is refused with
:class:`UnsupportedDelta` naming the reason; malformed payloads with :class:`DeltaError`.
"""
from __future__ import annotations

from pathlib import Path

from ..base_spec import BaseSpec
from ..delta import Delta
from ..errors import DeltaError
from ..validate import Limits, validate
from .detect import FORMATS, detect_format


def convert(path: str | Path, spec: BaseSpec, source_format: str = "auto") -> Delta:
    """Convert without validating (the store validates with its own limits)."""
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


def load_delta(path: str | Path, spec: BaseSpec, source_format: str = "auto", *,
               limits: Limits | None = None) -> Delta:
    """Folder or file -> validated :class:`Delta` carrying ``spec.fingerprint``."""
    delta = convert(path, spec, source_format)
    validate(delta, spec, limits)
    delta.base_fingerprint = spec.fingerprint
    return delta


__all__ = ["FORMATS", "Limits", "convert", "detect_format", "load_delta", "validate"]
