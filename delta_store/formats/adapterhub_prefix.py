"""AdapterHub ``adapters`` (1.3.0) prefix tuning -> a :class:`PromptPart` of finished K/V (docs/DELTAS.md §3.6).

ONE prefix module serves every layer. Its tensors are saved several times with identical values: under
each layer's attention (``<layer>.self_attn.prefix_tuning.pool.prefix_tunings.<name>.self_prefix.*``,
GPT-2 ``transformer.h.{i}.attn...``) and once at the model (``<base>.prefix_tuning.prefix_tunings.<name>
.self_prefix.*``). The copy under layer 1 is NOT layer 1's own prefix: all copies must agree.

* MLP form: ``KV = control_trans.2(act(control_trans.0(wte.weight)))`` ``[P, L * 2 * n_kv * head_dim]``,
  evaluated here once, at import, in the stored dtype (so the stored delta is the K/V the library's eval
  forward computes); the MLP itself is not kept.
* flat form: ``control_trans`` is one vector of ``P * L * 2 * n_kv * head_dim`` numbers.

Either is viewed ``[P, 2L, n_kv, head_dim]`` (:func:`~delta_store.prompt.split_flat_kv`). In attention
the prefix K/V sit in FRONT of the layer's own, after RoPE, never rotated; the real tokens keep positions
0.. ("from_zero"); every query sees all P slots. These are the library's *eager* results: its default
SDPA path aligns the causal mask top-left over the P + T keys (or drops the prefix under padding), which
no user of the library's eager attention would see.
"""
from __future__ import annotations

import re

import torch

from ..base_spec import BaseSpec
from ..errors import DeltaError, UnsupportedDelta
from ..prompt import PromptPart, split_flat_kv

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "swish": torch.nn.functional.silu,
                "silu": torch.nn.functional.silu}
_MLP_PARAMS = {"wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
               "control_trans.2.bias"}
UNIPELT_WHY = ("its gates are means of sigmoid(x W_g + b) over the whole sequence, so every position's output "
               "depends on later tokens (not causal): a KV cache cannot serve that exactly, and the library's own "
               "cached decoding computes something else")


def is_prefix_key(key: str) -> bool:
    return ".prefix_tuning." in key or key.startswith("prefix_tuning.")


def load_prefix(cfg: dict, tensors: dict[str, torch.Tensor], name: str, spec: BaseSpec, where: str) -> PromptPart:
    """The prefix of a ``prefix_tuning`` config (or union member) from its tensors (only prefix keys)."""
    if cfg.get("use_gating"):
        raise UnsupportedDelta(f"{where}: gated prefix tuning (UniPELT): {UNIPELT_WHY}")
    if cfg.get("leave_out"):
        raise UnsupportedDelta(f"{where}: prefix tuning with leave_out {cfg['leave_out']} puts the prefix in some "
                               f"layers only; served prefixes cover every layer's KV cache")
    key_re = re.compile(rf"^(?:(?P<at>.+)\.)?prefix_tuning\.(?:pool\.)?prefix_tunings\.{re.escape(name)}\."
                        rf"self_prefix\.(?P<param>.+)$")
    copies: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = key_re.match(key)
        if m is None:
            raise DeltaError(f"{where}: unknown prefix-tuning tensor {key!r} for an adapter named {name!r} "
                             f"(cross-attention and gate tensors are not served)")
        copies.setdefault(m.group("at") or "", {})[m.group("param")] = (key, t)
    if not copies:
        raise DeltaError(f"{where}: prefix_tuning config but no '...prefix_tunings.{name}.self_prefix.*' tensors")
    first_at, first = next(iter(copies.items()))
    for at, params in copies.items():  # one pool, saved under several paths: every copy must be the same
        same = set(params) == set(first) and all(torch.equal(params[p][1], first[p][1]) for p in first)
        if not same:
            raise DeltaError(f"{where}: the prefix copies under {first_at or 'the model'!r} and {at or 'the model'!r} "
                             f"differ; adapters stores ONE prefix for all layers, so the file is inconsistent")
    length = cfg.get("prefix_length", 30)
    flat = bool(cfg.get("flat", False))
    if flat:
        if set(first) != {"control_trans"}:
            raise DeltaError(f"{where}: flat prefix tuning expects one '...self_prefix.control_trans' vector, "
                             f"found {sorted(first)}")
        kv = first["control_trans"][1]
        what = f"{first['control_trans'][0]} (flat prefix)"
    else:
        if set(first) != _MLP_PARAMS:
            raise DeltaError(f"{where}: prefix tuning (flat false) expects {sorted(_MLP_PARAMS)} under self_prefix, "
                             f"found {sorted(first)}")
        kv = _evaluate_mlp(cfg, {p: t for p, (_, t) in first.items()}, length, where)
        what = f"{first['control_trans.2.weight'][0]} (prefix MLP output [prefix_length, out_features])"
    keys, values = split_flat_kv(kv, spec.num_layers, spec.num_kv_heads, spec.head_dim, where=f"{where}: {what}")
    if keys.shape[1] != length:
        raise DeltaError(f"{where}: the prefix holds {keys.shape[1]} virtual tokens, the config's prefix_length "
                         f"is {length}")
    return PromptPart(keys=keys, values=values, positions="from_zero")


def _evaluate_mlp(cfg: dict, p: dict[str, torch.Tensor], length: int, where: str) -> torch.Tensor:
    act_name = str(cfg.get("non_linearity", "tanh")).lower()
    act = _ACTIVATIONS.get(act_name)
    if act is None:
        raise UnsupportedDelta(f"{where}: prefix non_linearity {act_name!r} is not supported "
                               f"({', '.join(_ACTIVATIONS)} are)")
    wte = p["wte.weight"]
    if wte.dim() != 2 or wte.shape[0] != length:
        raise DeltaError(f"{where}: prefix wte.weight shape {tuple(wte.shape)}, expected [prefix_length {length}, "
                         f"hidden]")
    w0, b0, w2, b2 = (p[k] for k in ("control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
                                     "control_trans.2.bias"))
    if w0.dim() != 2 or w0.shape[1] != wte.shape[1] or w2.dim() != 2 or w2.shape[1] != w0.shape[0] \
            or b0.shape != (w0.shape[0],) or b2.shape != (w2.shape[0],):
        raise DeltaError(f"{where}: prefix MLP shapes do not chain: wte {tuple(wte.shape)}, control_trans.0 "
                         f"{tuple(w0.shape)} + {tuple(b0.shape)}, control_trans.2 {tuple(w2.shape)} + {tuple(b2.shape)}")
    if cfg.get("bottleneck_size") is not None and w0.shape[0] != cfg["bottleneck_size"]:
        raise DeltaError(f"{where}: prefix MLP width {w0.shape[0]}, the config's bottleneck_size is "
                         f"{cfg['bottleneck_size']}")
    dtype = torch.promote_types(wte.dtype, torch.float32)
    with torch.no_grad():  # what nn.Linear / nn.Tanh compute in the library's eval forward
        hidden = act(torch.nn.functional.linear(wte.to(dtype), w0.to(dtype), b0.to(dtype)))
        return torch.nn.functional.linear(hidden, w2.to(dtype), b2.to(dtype))  # [P, L * 2 * n_kv * head_dim]
