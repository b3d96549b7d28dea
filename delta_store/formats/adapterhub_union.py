"""AdapterHub ``ConfigUnion`` (``architecture: "union"``): several methods in one adapter (docs/DELTAS.md §3).

MAM (``MAMConfig``: prefix tuning + a parallel bottleneck adapter) is served: the two parts are
independent (the prefix enters attention, the adapter adds ``4.0 * up(relu(down(h)))`` next to the FFN),
so each member is imported by its own rules and both apply in one forward. UniPELT (gated prefix +
gated ``seq_bn`` + gated LoRA) is refused: its gates average over the whole sequence (see
:data:`~.adapterhub_prefix.UNIPELT_WHY`).

A union's tensors carry no member index, so they are split by what they are: ``...prefix_tuning...``
keys go to the prefix member, ``...loras.<name>...`` to the LoRA member, ``..._adapters.adapters.<name>...``
to the bottleneck member; at most one member per architecture.
"""
from __future__ import annotations

import re

import torch

from ..errors import DeltaError, UnsupportedDelta
from .adapterhub_config import bottleneck_config
from .adapterhub_prefix import UNIPELT_WHY, is_prefix_key


def union_members(cfg: dict, meta: dict, tensors: dict[str, torch.Tensor], name: str,
                  where: str) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """``[(member config with presets and defaults resolved, its tensors)]`` in the union's order."""
    configs = cfg.get("configs")
    if not isinstance(configs, list) or not configs:
        raise DeltaError(f"{where}: a ConfigUnion needs a non-empty 'configs' list (found {configs!r})")
    members = [bottleneck_config({**meta, "config": sub}, where) for sub in configs]
    if any(m.get("use_gating") for m in members):
        raise UnsupportedDelta(f"{where}: a gated ConfigUnion (UniPELT: gated prefix + bottleneck + LoRA): "
                               f"{UNIPELT_WHY}")
    archs = [m.get("architecture") or "bottleneck" for m in members]
    for arch in archs:
        if archs.count(arch) > 1:
            raise UnsupportedDelta(f"{where}: a ConfigUnion with two {arch!r} members cannot be split by tensor "
                                   f"name; not supported")
        if arch not in ("prefix_tuning", "bottleneck", "lora"):
            raise UnsupportedDelta(f"{where}: a ConfigUnion member of architecture {arch!r} is not supported "
                                   f"(prefix_tuning, bottleneck, lora are)")
    lora_re = re.compile(rf"\.loras\.{re.escape(name)}\.")
    bn_re = re.compile(rf"_adapters\.adapters\.{re.escape(name)}\.")
    split: dict[str, dict[str, torch.Tensor]] = {arch: {} for arch in archs}
    for key, t in tensors.items():
        arch = ("prefix_tuning" if is_prefix_key(key) else "lora" if lora_re.search(key)
                else "bottleneck" if bn_re.search(key) else None)
        if arch is None:
            raise DeltaError(f"{where}: tensor {key!r} belongs to no member of the union ({', '.join(archs)})")
        if arch not in split:
            raise DeltaError(f"{where}: tensor {key!r} is a {arch} tensor, but the union has no {arch} member "
                             f"({', '.join(archs)})")
        split[arch][key] = t
    for arch, part in split.items():
        if not part:
            raise DeltaError(f"{where}: the union's {arch} member has no tensors")
    return [(m, split[a]) for m, a in zip(members, archs)]
