"""OpenDelta (0.3.2 / git 067eed2) ``soft_prompt`` and ``prefix`` -> a delta's prompt part (docs/DELTAS.md §4.3).

* ``soft_prompt`` (any causal LM): ``soft_prompt_layer.soft_embeds [P, hidden]`` is concatenated in front
  of ``inputs_embeds`` and the attention mask gets P ones: input embeddings at positions 0..P-1, real
  tokens at P.. ("after_prefix"; on GPT-2 the ``wpe`` rows are added to the prompt too). ``token_init``
  and ``init_range`` only describe the initialisation the stored embeddings replace.
* ``prefix`` (GPT-2 only: OpenDelta has no prefix layer for any Llama attention class): passed to each
  attention as ``layer_past``, so the prefix K/V sit in front of the layer's own, every query sees all P
  slots (P zeros in front of the mask, GPT-2's causal buffer aligned bottom-right), and the real tokens
  keep ``wpe`` positions 0.. ("from_zero"). With ``reparameterize`` (the default) five tensors under the
  FIRST modified attention (``transformer.h.0.attn.reparams.*``) produce every layer's prefix:
  ``KV = control_trans.2(tanh(control_trans.0(wte.weight)))`` ``[P, n_modules * 2 * hidden]``, viewed
  ``[P, 2 * n_modules, hidden]`` with module i's key at ``2i`` and value at ``2i + 1``, each split into
  heads as ``[P, heads, head_dim]``; evaluated here once. Without it, each attention holds
  ``prefix.past_key`` / ``prefix.past_value`` ``[P, hidden]``. A prefix on only some layers is refused.
"""
from __future__ import annotations

import re

import torch

from ..base_spec import BaseSpec
from ..errors import DeltaError, UnsupportedDelta
from ..prompt import PromptPart, split_flat_kv
from .keys import layer_of

_REPARAMS = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
             "control_trans.2.bias")
_REPARAM_RE = re.compile(r"^(?P<mod>.+)\.reparams\.(?P<param>.+)$")
_PAST_RE = re.compile(r"^(?P<mod>.+)\.prefix\.(?P<param>past_key|past_value)$")


def load_soft_prompt(cfg: dict, tensors: dict[str, torch.Tensor], spec: BaseSpec, where: str) -> PromptPart:
    extra = sorted(set(tensors) - {"soft_prompt_layer.soft_embeds"})
    if extra or not tensors:
        raise DeltaError(f"{where}: a soft_prompt delta holds only 'soft_prompt_layer.soft_embeds', found "
                         f"{sorted(tensors) or 'nothing'}")
    e = tensors["soft_prompt_layer.soft_embeds"]
    n = int(cfg.get("soft_token_num", 100))
    if e.dim() != 2 or tuple(e.shape) != (n, spec.hidden_size):
        raise DeltaError(f"{where}: soft_prompt_layer.soft_embeds shape {tuple(e.shape)}, expected [soft_token_num "
                         f"{n}, {spec.hidden_size}] (the served {spec.model_type} base's hidden size)")
    if cfg.get("other_expand_ids") not in (None, {"attention_mask": 1, "token_type_ids": 0}):
        raise UnsupportedDelta(f"{where}: other_expand_ids {cfg['other_expand_ids']!r} extends inputs other than "
                               f"the attention mask; not supported")
    return PromptPart(embeddings=e.contiguous(), positions="after_prefix")


def load_prefix(cfg: dict, tensors: dict[str, torch.Tensor], spec: BaseSpec, where: str) -> PromptPart:
    if spec.model_type != "gpt2":
        raise UnsupportedDelta(f"{where}: OpenDelta prefix tuning exists for GPT-2 attention only (its PrefixModel "
                               f"raises NotImplementedError on {spec.model_type}), so there is no result to match")
    n = int(cfg.get("prefix_token_num", 6))
    if cfg.get("reparameterize", True):
        kv = _reparams(cfg, tensors, n, spec, where)
        keys, values = split_flat_kv(kv, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                                     where=f"{where}: reparams output (every layer's prefix)")
    else:
        keys, values = _per_layer(tensors, n, spec, where)
    if keys.shape[1] != n:
        raise DeltaError(f"{where}: the prefix holds {keys.shape[1]} virtual tokens, prefix_token_num is {n}")
    return PromptPart(keys=keys, values=values, positions="from_zero")


def _reparams(cfg: dict, tensors: dict[str, torch.Tensor], n: int, spec: BaseSpec, where: str) -> torch.Tensor:
    found: dict[str, torch.Tensor] = {}
    owners = set()
    for key, t in tensors.items():
        m = _REPARAM_RE.match(key)
        if m is None or m.group("param") not in _REPARAMS:
            raise DeltaError(f"{where}: unknown tensor {key!r} for a reparameterized prefix (expected "
                             f"<attention>.reparams.{{{', '.join(_REPARAMS)}}})")
        owners.add(m.group("mod"))
        found[m.group("param")] = t
    if len(owners) != 1 or set(found) != set(_REPARAMS):
        raise DeltaError(f"{where}: a reparameterized prefix needs the five reparams tensors under one attention "
                         f"module, found {sorted(tensors)}")
    wte, w0, b0, w2, b2 = (found[k] for k in _REPARAMS)
    if wte.dim() != 2 or wte.shape[0] != n or w0.dim() != 2 or w0.shape[1] != wte.shape[1] or w2.dim() != 2 \
            or w2.shape[1] != w0.shape[0] or b0.shape != (w0.shape[0],) or b2.shape != (w2.shape[0],):
        raise DeltaError(f"{where}: reparams shapes do not chain: wte {tuple(wte.shape)} (prefix_token_num {n}), "
                         f"control_trans.0 {tuple(w0.shape)}, control_trans.2 {tuple(w2.shape)}")
    per_layer = 2 * spec.hidden_size
    if w2.shape[0] % per_layer == 0 and w2.shape[0] // per_layer != spec.num_layers:
        raise UnsupportedDelta(f"{where}: the reparams output {w2.shape[0]} = {w2.shape[0] // per_layer} modules x 2 x "
                               f"{spec.hidden_size}: a prefix on {w2.shape[0] // per_layer} of the base's "
                               f"{spec.num_layers} layers; served prefixes cover every layer")
    dtype = torch.promote_types(wte.dtype, torch.float32)
    with torch.no_grad():  # ReparameterizeFunction.allocate_parameter in eval mode (dropout off)
        hidden = torch.tanh(torch.nn.functional.linear(wte.to(dtype), w0.to(dtype), b0.to(dtype)))
        return torch.nn.functional.linear(hidden, w2.to(dtype), b2.to(dtype))  # [P, L * 2 * hidden]


def _per_layer(tensors: dict[str, torch.Tensor], n: int, spec: BaseSpec,
               where: str) -> tuple[torch.Tensor, torch.Tensor]:
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PAST_RE.match(key)
        layer = layer_of(m.group("mod")) if m else None
        if m is None or layer is None:
            raise DeltaError(f"{where}: unknown tensor {key!r} for a prefix without reparameterize (expected "
                             f"<layer attention>.prefix.past_key / past_value)")
        if layer >= spec.num_layers:
            raise DeltaError(f"{where}: tensor {key!r} names layer {layer}, the served base has {spec.num_layers}")
        if tuple(t.shape) != (n, spec.hidden_size):
            raise DeltaError(f"{where}: tensor {key!r} shape {tuple(t.shape)}, expected [prefix_token_num {n}, "
                             f"{spec.hidden_size}]")
        per.setdefault(layer, {})[m.group("param")] = t
    if sorted(per) != list(range(spec.num_layers)) or any(set(v) != {"past_key", "past_value"} for v in per.values()):
        raise UnsupportedDelta(f"{where}: prefix tensors for layers {sorted(per)}: a prefix on some layers only (or a "
                               f"key without its value); served prefixes cover all {spec.num_layers} layers")
    shape = (n, spec.num_kv_heads, spec.head_dim)  # x.reshape(prefix_token_num, num_heads, -1) in PrefixLayerGPT2
    keys = torch.stack([per[i]["past_key"].reshape(shape) for i in range(spec.num_layers)])
    values = torch.stack([per[i]["past_value"].reshape(shape) for i in range(spec.num_layers)])
    return keys.contiguous(), values.contiguous()
