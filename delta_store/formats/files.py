"""Reading what the tools wrote: JSON configs and tensor files, never unpickling (D8).

``.bin`` files are torch pickles of ``dict[str, Tensor]``; ``torch.load(weights_only=True)`` only
rebuilds tensors and plain containers, so a pickle carrying code is refused, not run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DeltaError


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeltaError(f"{path}: cannot read JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise DeltaError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file or a weights-only torch pickle, on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise DeltaError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeltaError(f"{path}: refused: not a weights-only torch file ({first})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise DeltaError(f"{path}: expected a dict of name -> tensor, found {type(data).__name__}")
    return dict(data)


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeltaError(f"{path}: not a readable safetensors file ({exc})") from None


def first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None
