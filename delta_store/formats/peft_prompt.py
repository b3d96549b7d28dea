"""PEFT prompt-learning adapters -> a :class:`Delta` with a prompt part (peft 0.21.2, docs/DELTAS.md §2.6-§2.7).

Every prompt-learning file holds ONE tensor, ``prompt_embeddings [N, ...]``: what
``get_prompt_embedding_to_save`` returns, i.e. the prompt encoder already evaluated.

* ``PROMPT_TUNING`` (text or random init: only the initialisation differs), ``P_TUNING`` (the MLP/LSTM
  prompt encoder's output) and ``CPT`` (token embeddings plus their trained deltas): ``[N, hidden]``
  input embeddings, prepended to the token embeddings; real tokens at positions N.. (the forward sees
  one ``inputs_embeds`` of N + T rows).
* ``PREFIX_TUNING`` (with or without ``prefix_projection``: the MLP is applied before saving) and
  ``CARTRIDGE`` (the KV stored directly): the finished per-layer K/V ``[N, L * 2 * token_dim]``, laid
  out as ``get_prompt`` reshapes it, ``view(N, 2L, H, token_dim / H)`` with layer i's keys at ``2i``
  and values at ``2i + 1``. PEFT passes them as the cache, so the real tokens get positions N.., and
  the prefix keys are used as they are (never rotated). On grouped-query models PEFT sets
  ``token_dim = n_kv * head_dim`` and ``H = n_kv``; files from PEFT versions without that rule
  (``token_dim = hidden``) do not fit the KV cache and are refused with the numbers.
"""
from __future__ import annotations

import torch

from ..base_spec import BaseSpec
from ..delta import Delta
from ..errors import DeltaError, UnsupportedDelta
from ..prompt import PromptPart, split_flat_kv

EMBEDDING_TYPES = ("PROMPT_TUNING", "P_TUNING", "CPT")
KV_TYPES = ("PREFIX_TUNING", "CARTRIDGE")
SERVED_PROMPT_TYPES = EMBEDDING_TYPES + KV_TYPES
REFUSED_PROMPT_TYPES = {
    "MULTITASK_PROMPT_TUNING": "selects its prompt by a task id per request (task_ids), which a request cannot name",
    "ADAPTION_PROMPT": "LLaMA-Adapter adds a second, gated softmax over its adaption tokens inside attention; "
                       "that is not a KV prefix sharing the request's softmax",
}


def load_peft_prompt(cfg: dict, peft_type: str, tensors: dict[str, torch.Tensor], spec: BaseSpec,
                     where: str) -> Delta:
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise DeltaError(f"{where}: tensor {extra[0]!r} does not belong in a {peft_type} adapter "
                         f"(it holds prompt_embeddings only)")
    if "prompt_embeddings" not in tensors:
        raise DeltaError(f"{where}: a {peft_type} adapter needs its prompt_embeddings tensor")
    t = tensors["prompt_embeddings"]
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedDelta(f"{where}: num_transformer_submodules {cfg['num_transformer_submodules']} is an "
                               f"encoder-decoder prompt; only decoder-only causal LMs are served")
    n = cfg.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DeltaError(f"{where}: num_virtual_tokens must be a positive integer, got {n!r}")
    if t.dim() != 2 or t.shape[0] != n:
        raise DeltaError(f"{where}: prompt_embeddings shape {tuple(t.shape)} does not hold num_virtual_tokens {n} "
                         f"rows")
    base = cfg.get("base_model_name_or_path") or "unknown base"
    if peft_type in EMBEDDING_TYPES:
        if t.shape[1] != spec.hidden_size:
            raise DeltaError(f"{where}: prompt_embeddings shape {tuple(t.shape)}, expected [{n}, {spec.hidden_size}] "
                             f"(the served {spec.model_type} base's hidden size; the config's token_dim is "
                             f"{cfg.get('token_dim')}, made for {base}?)")
        part = PromptPart(embeddings=t.contiguous(), positions="after_prefix")
    else:
        keys, values = split_flat_kv(t, *_kv_geometry(cfg, spec, where), where=f"{where}: prompt_embeddings")
        part = PromptPart(keys=keys, values=values, positions="after_prefix")
    return Delta({}, source_format="peft", description=f"peft {peft_type} ({n} virtual tokens) from {base}",
                 prompt=part)


def _kv_geometry(cfg: dict, spec: BaseSpec, where: str) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of the config, checked against the served base's KV cache."""
    layers, dim, heads = cfg.get("num_layers"), cfg.get("token_dim"), cfg.get("num_attention_heads")
    for name, value in (("num_layers", layers), ("token_dim", dim), ("num_attention_heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeltaError(f"{where}: config {name} must be a positive integer, got {value!r}")
    if dim % heads:
        raise DeltaError(f"{where}: token_dim {dim} is not a multiple of num_attention_heads {heads}")
    head_dim = dim // heads
    if layers != spec.num_layers:
        raise DeltaError(f"{where}: prefix for num_layers {layers}, the served {spec.model_type} base has "
                         f"{spec.num_layers} layers (another base model?)")
    if (heads, head_dim) != (spec.num_kv_heads, spec.head_dim):
        gqa = ""
        if spec.num_kv_heads != spec.num_attention_heads and (heads, dim) == (spec.num_attention_heads,
                                                                             spec.hidden_size):
            gqa = (f"; the served base uses grouped-query attention ({spec.num_kv_heads} KV heads for "
                   f"{spec.num_attention_heads} query heads): PEFT versions without the GQA rule wrote "
                   f"token_dim = hidden_size, and such a prefix does not fit the KV cache")
        raise DeltaError(f"{where}: token_dim {dim} / num_attention_heads {heads} = {heads} KV heads of size "
                         f"{head_dim}, the served {spec.model_type} base's KV cache has {spec.num_kv_heads} KV heads "
                         f"of size {spec.head_dim}{gqa}")
    return layers, heads, head_dim
