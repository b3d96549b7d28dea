"""A plain BitFit file -> canonical :class:`Delta` (docs/DELTAS.md §5).

The file is ``{module path}.bias`` tensors, as a hand-rolled ``requires_grad`` on biases plus
``torch.save`` (or ``safetensors.save_file``) produces them. Values are **absolute** trained biases
by default, turned into deltas by subtracting the base bias (a module without a base bias takes the
value as is). A safetensors file whose metadata says ``bitfit_bias = "additive"`` holds deltas already.
"""
from __future__ import annotations

from pathlib import Path

from ..base_spec import BaseSpec
from ..delta import Delta
from ..errors import DeltaError
from .builder import DeltaBuilder
from .files import read_tensors, safetensors_metadata
from .keys import KeyMapper

METADATA_KEY = "bitfit_bias"  # "absolute" (default) | "additive"
_MODES = ("absolute", "additive")


def load_bitfit(path: str | Path, spec: BaseSpec) -> Delta:
    path = Path(path)
    where = f"bitfit {path.name}"
    mode = "absolute"
    if path.suffix == ".safetensors":
        mode = safetensors_metadata(path).get(METADATA_KEY, "absolute")
        if mode not in _MODES:
            raise DeltaError(f"{where}: metadata {METADATA_KEY}={mode!r}, expected one of {_MODES}")
    tensors = read_tensors(path)
    if not tensors:
        raise DeltaError(f"{where}: the file holds no tensors")
    keys = KeyMapper(spec, where)
    builder = DeltaBuilder(spec, "bitfit")
    for key, t in tensors.items():
        if not key.endswith(".bias"):
            raise DeltaError(f"{where}: tensor {key!r} is not a bias; a BitFit file holds only "
                             f"'<module path>.bias' tensors")
        info = keys.module(key[: -len(".bias")].removesuffix(".base_layer"), key=key)
        if t.numel() != info.out_features:
            raise DeltaError(f"{where}: {key!r}: expected shape ({info.out_features},) for {info.path}, "
                             f"found {tuple(t.shape)}")
        if mode == "additive":
            builder.additive_bias(info, t)
        else:
            builder.absolute_bias(info, t, key=key)
    return builder.build(description=f"bitfit ({mode} biases)")
