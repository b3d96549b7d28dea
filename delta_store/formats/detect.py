"""Which tool wrote an uploaded delta, from its files alone (never from its name or extension).

* PEFT: a folder with ``adapter_config.json`` holding ``peft_type`` (or a root whose subfolders are
  PEFT adapters: reported as PEFT so the loader can list them).
* AdapterHub ``adapters``: ``adapter_config.json`` holding ``"config"`` plus ``pytorch_adapter.bin``
  or ``adapter.safetensors``.
* OpenDelta: ``config.json`` holding ``delta_type``.
* native: a lone ``.safetensors`` whose metadata says ``format = "deltaserve.native"``.
* BitFit: any other lone tensor file (``.safetensors`` or weights-only ``.bin``/``.pt``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DeltaError
from ..native import sniff_native

FORMATS = ("peft", "adapterhub", "opendelta", "native", "bitfit")
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")


def _json_keys(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS`, or a :class:`DeltaError` saying what was found instead."""
    path = Path(path)
    if not path.exists():
        raise DeltaError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors" and sniff_native(path):
            return "native"
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            return "bitfit"
        raise DeltaError(f"{path}: a lone file must be .safetensors or a weights-only torch .bin to be a "
                         f"native or BitFit delta")
    cfg_path = path / "adapter_config.json"
    if cfg_path.is_file():
        cfg = _json_keys(cfg_path)
        if "peft_type" in cfg:
            return "peft"
        if "config" in cfg:
            if any((path / n).is_file() for n in ADAPTERHUB_WEIGHTS):
                return "adapterhub"
            raise DeltaError(f"{path}: AdapterHub adapter_config.json without {' or '.join(ADAPTERHUB_WEIGHTS)}")
        raise DeltaError(f"{path}: adapter_config.json has neither 'peft_type' (PEFT) nor 'config' (AdapterHub)")
    if (path / "config.json").is_file():
        if "delta_type" in _json_keys(path / "config.json"):
            return "opendelta"
        raise DeltaError(f"{path}: config.json without 'delta_type': a full model checkpoint, not a delta")
    subs = [p for p in sorted(path.iterdir()) if p.is_dir() and (p / "adapter_config.json").is_file()]
    if subs and "peft_type" in _json_keys(subs[0] / "adapter_config.json"):
        return "peft"
    files = sorted(p.name for p in path.iterdir())[:8]
    raise DeltaError(f"{path}: not a PEFT, AdapterHub or OpenDelta folder (found: {', '.join(files) or 'nothing'})")
