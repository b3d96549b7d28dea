"""AdapterHub ``adapters`` (1.3.0) folders -> canonical :class:`Delta` (docs/DELTAS.md §3).

Bottleneck adapters land on the residual-site output module of their layer (``o_proj`` /
``down_proj``, GPT-2 ``attn.c_proj`` / ``mlp.c_proj``) with the input their flags imply on a pre-LN
model (§3.4): Pfeiffer ``seq_bn`` reads ``h + a`` ("output+residual"), Houlsby ``double_seq_bn``
reads ``a`` ("output"), ``par_bn`` reads ``h`` ("residual", scale 4.0); Compacter / Compacter++
(``phm_layer``) are those placements with PHM projections multiplied out (``adapterhub_phm.py``).
LoRA is ``alpha/r`` (1.0 for
files from ``adapters`` < 1.1.0 with r != alpha, PR #770); (IA)3 is output scaling by
``lora_B * alpha`` on every target, ``down_proj`` included. Keys name the real modules, whatever
the config flags say (Llama's ``intermediate_lora`` wraps ``down_proj``, Qwen2's wraps ``up_proj``).
Prefix tuning becomes the delta's prompt part (:mod:`.adapterhub_prefix`); a ``ConfigUnion`` (MAM)
imports each member by its own rules (:mod:`.adapterhub_union`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..base_spec import BaseSpec
from ..delta import AdapterTerm, Delta
from ..errors import DeltaError, UnsupportedDelta
from . import adapterhub_phm
from .adapterhub_config import adapter_source, bottleneck_config, check_lora_config, lora_alpha, map_activation
from .adapterhub_prefix import load_prefix
from .adapterhub_union import union_members
from .builder import DeltaBuilder
from .files import first_existing, read_json, read_tensors
from .keys import KeyMapper, layer_of

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHT_NAMES = ("pytorch_model_head.bin", "model_head.safetensors")
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
_SITES = {"attention_adapters": "attn", "output_adapters": "ffn"}


def load_adapterhub(path: str | Path, spec: BaseSpec) -> Delta:
    folder = Path(path)
    where = f"adapterhub {folder.name}"
    meta = read_json(folder / CONFIG_NAME)
    if (folder / FUSION_CONFIG_NAME).is_file():
        raise UnsupportedDelta(f"{where}: AdapterFusion combines several adapters with attention; not supported")
    _check_head(folder, where)
    weights = first_existing(folder, WEIGHT_NAMES)
    if weights is None:
        raise DeltaError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} next to {CONFIG_NAME}")
    cfg = bottleneck_config(meta, where)  # presets resolved, pre-versioned activation names renamed
    tensors = read_tensors(weights)
    name = meta.get("name") or _only_name(tensors, where)
    arch = cfg.get("architecture") or "bottleneck"
    builder = DeltaBuilder(spec, "adapterhub")
    members = union_members(cfg, meta, tensors, name, where) if arch == "union" else [(cfg, tensors)]
    for member_cfg, member_tensors in members:
        member = member_cfg.get("architecture") or "bottleneck"
        if member == "bottleneck":
            _bottleneck(member_cfg, member_tensors, name, spec, builder, where)
        elif member == "lora":
            _lora(member_cfg, meta, member_tensors, name, spec, builder, where)
        elif member == "prefix_tuning":
            builder.prompt(load_prefix(member_cfg, member_tensors, name, spec, where))
        elif member == "prompt_tuning":
            raise UnsupportedDelta(f"{where}: architecture 'prompt_tuning': adapters 1.3.0 itself cannot run prompt "
                                   f"tuning on decoder-only models (Llama and GPT-2 set support_prompt_tuning=False, "
                                   f"Qwen2's interface leaves it out), so there is no library result to match")
        else:
            raise UnsupportedDelta(f"{where}: architecture {member!r} is not supported "
                                   f"(bottleneck, lora, ia3, prefix_tuning, union (MAM) are)")
    return builder.build(description=f"adapterhub {arch} {name!r} ({meta.get('version', 'unversioned')})")


def _check_head(folder: Path, where: str) -> None:
    """A head file that merely copies the base lm_head is ignored (never even read); a trained flexible
    head (head_config with a config) replaces the base LM head, so it is refused."""
    if not (folder / HEAD_CONFIG_NAME).is_file():
        heads = [n for n in HEAD_WEIGHT_NAMES if (folder / n).is_file()]
        if heads:
            raise UnsupportedDelta(f"{where}: {heads[0]} without {HEAD_CONFIG_NAME}: cannot tell a copy of the base "
                                   f"LM head from a trained one")
        return
    head = read_json(folder / HEAD_CONFIG_NAME)
    if head.get("config") is not None:
        kind = head["config"].get("head_type", "?") if isinstance(head["config"], dict) else head["config"]
        raise UnsupportedDelta(f"{where}: a trained prediction head ({kind}) replaces the base LM head; "
                               f"only adapters saved on the model's own causal LM head are supported")


def _only_name(tensors: dict[str, torch.Tensor], where: str) -> str:
    names = {m.group(1) for k in tensors for m in [re.search(r"\.(?:adapters|loras|prefix_tunings)\.([^.]+)\.", k)] if m}
    if len(names) != 1:
        raise DeltaError(f"{where}: adapter_config.json has no 'name' and the tensors name {sorted(names) or 'none'}")
    return names.pop()


def _bottleneck(cfg: dict, tensors: dict, name: str, spec: BaseSpec, builder: DeltaBuilder, where: str) -> None:
    source = adapter_source(cfg, where)
    activation = map_activation(cfg.get("non_linearity", "relu"), where)
    keys = KeyMapper(spec, where)
    key_re = re.compile(rf"^(?P<prefix>.+)\.(?P<site>attention_adapters|output_adapters)\.adapters\."
                        rf"{re.escape(name)}\.(?P<rest>.+)$")
    groups: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    tensors = dict(tensors)
    shared = adapterhub_phm.take_shared(tensors, name) if cfg.get("phm_layer") else {}
    for key, t in tensors.items():
        m = key_re.match(key)
        layer = layer_of(m.group("prefix")) if m else None
        if m is None or layer is None:
            raise DeltaError(f"{where}: unknown tensor {key!r} for a bottleneck adapter named {name!r}")
        groups.setdefault((layer, m.group("site")), {})[m.group("rest")] = (key, t)
    leave_out = set(cfg.get("leave_out") or [])
    for (layer, site), params in sorted(groups.items()):
        key0 = next(iter(params.values()))[0]
        flag = "mh_adapter" if site == "attention_adapters" else "output_adapter"
        if not cfg.get(flag, site == "output_adapters") or layer in leave_out:
            raise DeltaError(f"{where}: tensor {key0!r} is for an adapter the config does not create "
                             f"({flag}={cfg.get(flag)}, leave_out={sorted(leave_out)}); the library would ignore it")
        info = keys.site_module(layer, _SITES[site], key=key0)
        if cfg.get("phm_layer"):  # Compacter: PHM projections, multiplied out once here
            m = _width(cfg, spec, layer, key0, where)
            down, down_bias, up, up_bias = adapterhub_phm.projections(cfg, params, shared, spec.hidden_size, m,
                                                                      f"{where} layer {layer} {site}")
            scale, up, up_bias = _scaling(cfg, params, up, up_bias, key0, where)
            builder.adapter(info, AdapterTerm(down, down_bias, up, up_bias, activation, scale, source), key=key0)
            continue
        downs = {k: v for k, v in params.items() if k.startswith("adapter_down.")}
        linear = [k.rsplit(".", 1)[0] for k, (_, t) in downs.items() if k.endswith(".weight") and t.dim() == 2]
        if len(linear) != 1 or "adapter_up.weight" not in params or "adapter_up.bias" not in params \
                or f"{linear[0]}.bias" not in params:
            raise DeltaError(f"{where}: layer {layer} {site}: expected adapter_down.<i>.weight/bias and "
                             f"adapter_up.weight/bias, found {sorted(params)}")
        known = {f"{linear[0]}.weight", f"{linear[0]}.bias", "adapter_up.weight", "adapter_up.bias", "scaling"}
        extra = sorted(set(params) - known)
        if extra:
            raise DeltaError(f"{where}: unknown tensor {params[extra[0]][0]!r} (gates and norms are not supported; "
                             f"PHM tensors need phm_layer=true)")
        down, down_bias = params[f"{linear[0]}.weight"][1], params[f"{linear[0]}.bias"][1]
        up, up_bias = params["adapter_up.weight"][1], params["adapter_up.bias"][1]
        _check_width(cfg, spec, layer, int(down.shape[0]), key0, where)
        scale, up, up_bias = _scaling(cfg, params, up, up_bias, key0, where)
        builder.adapter(info, AdapterTerm(down.contiguous(), down_bias.contiguous(), up.contiguous(),
                                          up_bias.contiguous(), activation, scale, source), key=key0)


def _reduction(cfg: dict, layer: int):
    rf = cfg.get("reduction_factor", 16)
    if isinstance(rf, dict):  # {"0": 4, "default": 16}: per-layer reduction factors
        rf = rf.get(str(layer), rf.get("default"))
    return rf


def _width(cfg: dict, spec: BaseSpec, layer: int, key: str, where: str) -> int | None:
    """The bottleneck width the config implies for ``layer`` (None when it does not say)."""
    rf = _reduction(cfg, layer)
    if rf is None:
        if cfg.get("phm_layer"):
            raise DeltaError(f"{where}: {key!r}: a PHM adapter needs reduction_factor to size its projections")
        return None
    return max(1, int(spec.hidden_size // float(rf)))


def _check_width(cfg: dict, spec: BaseSpec, layer: int, width: int, key: str, where: str) -> None:
    want = _width(cfg, spec, layer, key, where)
    if want is not None and width != want:
        raise DeltaError(f"{where}: {key!r}: reduction_factor {_reduction(cfg, layer)} on hidden {spec.hidden_size} "
                         f"gives width {want}, the tensor has {width}")


def _scaling(cfg: dict, params: dict, up: torch.Tensor, up_bias: torch.Tensor, key: str, where: str):
    scaling = cfg.get("scaling", 1.0)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
        return float(scaling), up, up_bias
    t = params.get("scaling", (None, None))[1]
    if t is None:
        raise DeltaError(f"{where}: scaling={scaling!r} but no '...scaling' tensor next to {key!r}")
    if scaling == "learned" and t.numel() == 1:
        return float(t.reshape(())), up, up_bias
    if scaling == "channel" and t.numel() == up.shape[0]:
        s = t.reshape(-1, 1).to(up.dtype)  # [h, 1]: scaling*(up z + b) == (s*up) z + s*b, folded once here
        return 1.0, up * s, up_bias * s.reshape(-1)
    raise DeltaError(f"{where}: scaling={scaling!r} with a scaling tensor of shape {tuple(t.shape)}")


def _lora(cfg: dict, meta: dict, tensors: dict, name: str, spec: BaseSpec, builder: DeltaBuilder,
          where: str) -> None:
    check_lora_config(cfg, where)
    r, alpha = int(cfg.get("r", 8)), lora_alpha(cfg, meta)
    scale_mode = cfg.get("composition_mode", "add") == "scale"
    keys = KeyMapper(spec, where)
    key_re = re.compile(rf"^(?P<mod>.+)\.loras\.{re.escape(name)}\.(?P<param>lora_A|lora_B)$")
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = key_re.match(key)
        if m is None:
            raise DeltaError(f"{where}: unknown tensor {key!r} for a LoRA/(IA)3 adapter named {name!r}")
        groups.setdefault(m.group("mod"), {})[m.group("param")] = (key, t)
    leave_out = set(cfg.get("leave_out") or [])
    for mod, params in groups.items():
        key0 = next(iter(params.values()))[0]
        if layer_of(mod) in leave_out:
            raise DeltaError(f"{where}: tensor {key0!r} is in a leave_out layer; the library would ignore it")
        info = keys.module(mod, key=key0)
        if "lora_B" not in params:
            raise DeltaError(f"{where}: module {mod!r} has no lora_B tensor")
        b = params["lora_B"][1]
        merged = info.kind == "conv1d" and info.leaf == "c_attn" and b.shape[0] != info.out_features
        slices = _qkv_slices(cfg, info.out_features, where) if merged else None
        if scale_mode:  # (IA)3: y = base(x) * lora_B * alpha, bias included
            vec = b.reshape(-1)
            if slices is not None:  # GPT-2 fused qkv: untouched slices are scaled by 1 * alpha
                vec = _scatter_rows(vec.reshape(-1, 1), slices, info.out_features, fill=1.0).reshape(-1)
            if vec.numel() != info.out_features:
                raise DeltaError(f"{where}: {params['lora_B'][0]!r}: expected shape ({info.out_features}, 1) "
                                 f"for {info.path}, found {tuple(b.shape)}")
            builder.out_scale(info, vec * alpha)
            continue
        if "lora_A" not in params:
            raise DeltaError(f"{where}: module {mod!r} has no lora_A tensor")
        a = params["lora_A"][1]
        if slices is not None:  # LoRAMergedLinear: A [r*n, in], B [d*n, r] applied per group
            b = _block_b(b, r, slices, info.out_features)
        elif a.shape[0] != r:
            raise DeltaError(f"{where}: {params['lora_A'][0]!r}: config r={r}, lora_A has rank {a.shape[0]}")
        builder.lora(info, a, b, alpha / r, key=key0)


def _qkv_slices(cfg: dict, out: int, where: str) -> list[int]:
    """Which thirds of GPT-2's fused c_attn output (q=0, k=1, v=2) the merged LoRA touches."""
    mats = cfg.get("attn_matrices") or ["q", "v"]
    idx = [i for i, m in enumerate("qkv") if m in mats]
    if not idx or out % 3:
        raise DeltaError(f"{where}: cannot split fused c_attn (out {out}) by attn_matrices {mats}")
    return idx


def _scatter_rows(t: torch.Tensor, slices: list[int], out: int, fill: float) -> torch.Tensor:
    d = out // 3
    if t.shape[0] != d * len(slices):
        raise DeltaError(f"fused c_attn: expected {d * len(slices)} rows for {len(slices)} of q/k/v, "
                         f"found {t.shape[0]}")
    full = torch.full((out, t.shape[1]), fill, dtype=t.dtype)
    for g, j in enumerate(slices):
        full[j * d:(j + 1) * d] = t[g * d:(g + 1) * d]
    return full


def _block_b(b: torch.Tensor, r: int, slices: list[int], out: int) -> torch.Tensor:
    """Grouped-conv lora_B [d*n, r] -> dense B [out, r*n]: group g maps rank block g to slice j_g."""
    d, n = out // 3, len(slices)
    if tuple(b.shape) != (d * n, r):
        raise DeltaError(f"fused c_attn: lora_B expected shape ({d * n}, {r}), found {tuple(b.shape)}")
    full = torch.zeros(out, r * n, dtype=b.dtype)
    for g, j in enumerate(slices):
        full[j * d:(j + 1) * d, g * r:(g + 1) * r] = b[g * d:(g + 1) * d]
    return full
