"""Reading what the tools wrote: JSON configs and tensor files, never unpickling (D8).

``.bin`` files are torch pickles of ``dict[str, Tensor]``; ``torch.load(weights_only=True)`` only
rebuilds tensors and plain containers, so a pickle carrying code is refused, not run. Two refusals
are told apart, because they mean different things to the uploader: an *unsafe pickle* (it names a
global the weights-only unpickler does not allow) and a *truncated or corrupt* file (torch's own
reader does not check the zip container's CRC-32s, so they are checked here first: a flipped bit in
the tensor bytes is refused, not served).
"""
from __future__ import annotations

import json
import pickle
import zipfile
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
    _check_zip_crcs(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            why = next((line.strip() for line in str(exc).splitlines() if "global" in line.lower()),
                       "it builds objects other than tensors")
            raise DeltaError(f"{path}: refused: unsafe pickle, never loaded ({why})") from None
        raise DeltaError(f"{path}: truncated or corrupt torch file ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001  torch raises RuntimeError, EOFError, ... on a broken file
        raise DeltaError(f"{path}: truncated or corrupt torch file ({_first_line(exc)})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise DeltaError(f"{path}: expected a dict of name -> tensor, found {type(data).__name__}")
    return dict(data)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_zip_crcs(path: Path) -> None:
    """torch.save writes a zip (since torch 1.6) with a CRC-32 per record; read every record once so the
    checksums are verified. A record stored with CRC 0 (``torch.serialization.set_crc32_options(False)``)
    has no checksum to verify. Legacy (non-zip) pickles have none at all."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 or info.is_dir():
                    continue
                with zf.open(info) as member:
                    while member.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise DeltaError(f"{path}: truncated or corrupt torch file ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001  zlib.error and friends from a damaged compressed record
        raise DeltaError(f"{path}: truncated or corrupt torch file ({_first_line(exc)})") from None


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
