"""OpenDelta (0.3.2 / git 067eed2) ``save_finetuned`` folders -> canonical :class:`Delta` (docs/DELTAS.md §4).

``config.json`` is diff-only: fields still at their default are absent, so defaults come from the
delta config classes (lora_r 8, lora_alpha 16, bottleneck_dim 24, non_linearity gelu_new). Keys in
``pytorch_model.bin`` are plain backbone module paths; they, not ``modified_modules``, say what was
changed. Served: ``lora`` (``y += x A^T B^T * alpha/r``), ``adapter`` (on the OUTPUT o of the named
module: ``o' = o + up(act(down(o)))``, source "output"), ``bitfit`` (absolute biases: the delta is
``stored - base``; bias-less Linear layers got a new bias, so there the value is the delta), and
``compacter``, ``low_rank_adapter``, ``parallel_adapter`` (expanded into adapters:
``opendelta_adapters.py``), and ``soft_prompt`` / ``prefix`` as the delta's prompt part
(:mod:`.opendelta_prompt`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..base_spec import BaseSpec
from ..delta import AdapterTerm, Delta
from ..errors import DeltaError, UnsupportedDelta
from .adapterhub_config import map_activation
from .builder import DeltaBuilder
from .files import first_existing, read_json, read_tensors
from .keys import KeyMapper
from .opendelta_adapters import load_kind
from .opendelta_prompt import load_prefix, load_soft_prompt

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.safetensors", "model.safetensors")
SERVED = ("lora", "adapter", "bitfit", "compacter", "low_rank_adapter", "parallel_adapter", "soft_prompt", "prefix")
_EXPANDED = ("compacter", "low_rank_adapter", "parallel_adapter")
_WHY_NOT: dict[str, str] = {  # delta types refused with a reason of their own (none today: every other type
    # gets "not supported" with the list of the served ones)
}
_LORA_RE = re.compile(r"^(?P<mod>.+)\.lora\.(?P<param>lora_A|lora_B)$")
_ADAPTER_RE = re.compile(r"^(?P<mod>.+)\.adapter\.modulelist\.(?P<proj>down_proj|up_proj)\.(?P<leaf>weight|bias)$")


def load_opendelta(path: str | Path, spec: BaseSpec) -> Delta:
    folder = Path(path)
    where = f"opendelta {folder.name}"
    cfg = read_json(folder / CONFIG_NAME)
    kind = cfg.get("delta_type")
    if kind not in SERVED:
        why = _WHY_NOT.get(kind, f"is not supported (supported: {', '.join(SERVED)})")
        raise UnsupportedDelta(f"{where}: delta_type {kind!r} {why}")
    weights = first_existing(folder, WEIGHT_NAMES)
    if weights is None:
        raise DeltaError(f"{folder}: no {WEIGHT_NAMES[0]} next to {CONFIG_NAME}")
    tensors = read_tensors(weights)
    builder = DeltaBuilder(spec, "opendelta")
    description = f"opendelta {kind} ({cfg.get('backbone_class', 'unknown backbone')})"
    if kind in ("soft_prompt", "prefix"):
        builder.prompt((load_soft_prompt if kind == "soft_prompt" else load_prefix)(cfg, tensors, spec, where))
        return builder.build(description=description)
    keys = KeyMapper(spec, where)
    if kind in _EXPANDED:
        load_kind(kind, cfg, tensors, spec, keys, builder, where)
        return builder.build(description=description)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = (_LORA_RE if kind == "lora" else _ADAPTER_RE).match(key) if kind != "bitfit" else None
        if m is not None:
            param = m.group("param") if kind == "lora" else f"{m.group('proj')}.{m.group('leaf')}"
            groups.setdefault(m.group("mod"), {})[param] = (key, t)
        elif kind == "bitfit" and key.endswith(".bias"):
            info = keys.module(key[: -len(".bias")], key=key)
            if info.kind == "rmsnorm":
                raise DeltaError(f"{where}: tensor {key!r}: {info.path} is an RMSNorm, which has no bias to shift")
            builder.absolute_bias(info, t, key=key)
        elif key.endswith(".weight"):
            raise UnsupportedDelta(f"{where}: tensor {key!r} is a full weight: a whole-model save (freeze_module("
                                   f"set_state_dict=True) was not called) or unfrozen modules, not a delta")
        else:
            raise DeltaError(f"{where}: unknown tensor {key!r} for delta_type {kind!r}")
    for mod, params in groups.items():
        key0 = next(iter(params.values()))[0]
        info = keys.module(mod, key=key0)
        if kind == "lora":
            _lora(cfg, info, params, builder, where)
        else:
            _adapter(cfg, info, params, builder, where)
    return builder.build(description=description)


def _lora(cfg: dict, info, params: dict, builder: DeltaBuilder, where: str) -> None:
    if set(params) != {"lora_A", "lora_B"}:
        raise DeltaError(f"{where}: {info.path}: expected lora.lora_A and lora.lora_B, found {sorted(params)}")
    (key_a, a), (_, b) = params["lora_A"], params["lora_B"]
    r, alpha = int(cfg.get("lora_r", 8)), float(cfg.get("lora_alpha", 16))
    if a.dim() != 2 or a.shape[0] != r:
        raise DeltaError(f"{where}: {key_a!r}: config lora_r={r}, lora_A has shape {tuple(a.shape)}")
    builder.lora(info, a, b, alpha / r, key=key_a)


def _adapter(cfg: dict, info, params: dict, builder: DeltaBuilder, where: str) -> None:
    need = {"down_proj.weight", "down_proj.bias", "up_proj.weight", "up_proj.bias"}
    if set(params) != need:
        raise DeltaError(f"{where}: {info.path}: expected adapter.modulelist.{{down,up}}_proj.{{weight,bias}}, "
                         f"found {sorted(params)}")
    down = params["down_proj.weight"][1]
    width = int(cfg.get("bottleneck_dim", 24))
    if down.dim() != 2 or down.shape[0] != width:
        raise DeltaError(f"{where}: {params['down_proj.weight'][0]!r}: config bottleneck_dim={width}, "
                         f"found shape {tuple(down.shape)}")
    act = map_activation(cfg.get("non_linearity", "gelu_new"), where)
    term = AdapterTerm(down.contiguous(), params["down_proj.bias"][1].contiguous(),
                       params["up_proj.weight"][1].contiguous(), params["up_proj.bias"][1].contiguous(),
                       act, 1.0, "output")
    builder.adapter(info, term, key=params["down_proj.weight"][0])
