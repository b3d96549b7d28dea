"""Validation of a delta's prompt part (:class:`~delta_store.prompt.PromptPart`) against the served base.

The part's K/V go straight into the served KV cache, so its geometry must be the cache's exactly:
one prefix per decoder layer, the base's KV head count (grouped-query attention included) and head
size. Every error names the tensor, the shape found and the shape the served base needs, so a tenant
who uploaded a prefix trained on another base sees which dimension is off.
"""
from __future__ import annotations

import torch

from .base_spec import BaseSpec
from .errors import DeltaError
from .prompt import PromptPart


def validate_prompt(part: PromptPart, spec: BaseSpec, *, dtypes: tuple[torch.dtype, ...], max_tensor_bytes: int,
                    max_model_len: int = 0) -> None:
    """Raise :class:`DeltaError` unless ``part`` fits ``spec`` (and leaves room under ``max_model_len``)."""
    part.check_structure()
    for name, t in part.tensors().items():
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            raise DeltaError(f"prompt.{name}: dtype {getattr(t, 'dtype', type(t).__name__)} not allowed "
                             f"(allowed: {', '.join(str(d) for d in dtypes)})")
        nbytes = t.numel() * t.element_size()
        if nbytes > max_tensor_bytes:
            raise DeltaError(f"prompt.{name}: {nbytes} bytes exceeds the per-tensor limit {max_tensor_bytes}")
    if part.form == "embeddings":
        e = part.embeddings
        if e.dim() != 2 or e.shape[1] != spec.hidden_size or e.shape[0] < 1:
            raise DeltaError(f"prompt.embeddings: shape {tuple(e.shape)}, expected [num_virtual_tokens, "
                             f"{spec.hidden_size}] (the served {spec.model_type} base's hidden size)")
    else:
        _check_kv(part, spec)
    n = part.num_virtual_tokens
    if max_model_len and n + 2 > max_model_len:
        raise DeltaError(f"prompt: num_virtual_tokens {n} leaves no room under the server's max_model_len "
                         f"{max_model_len} (a request needs at least 1 prompt and 1 generated token after the "
                         f"{n} virtual tokens)")
    if spec.max_positions and part.positions == "after_prefix" and n + 1 > spec.max_positions:
        raise DeltaError(f"prompt: num_virtual_tokens {n} puts the first real token at position {n}, past the "
                         f"served base's {spec.max_positions} positions")


def _check_kv(part: PromptPart, spec: BaseSpec) -> None:
    want = ("{} layers", spec.num_layers), ("{} KV heads", spec.num_kv_heads), ("head size {}", spec.head_dim)
    for name, t in (("keys", part.keys), ("values", part.values)):
        if t.dim() != 4:
            raise DeltaError(f"prompt.{name}: shape {tuple(t.shape)}, expected 4 dims [layers {spec.num_layers}, "
                             f"num_virtual_tokens, KV heads {spec.num_kv_heads}, head size {spec.head_dim}]")
        found = (t.shape[0], t.shape[2], t.shape[3])
        for (what, expected), got in zip(want, found):
            if got != expected:
                raise DeltaError(f"prompt.{name}: shape {tuple(t.shape)}: {what.format(got)}, the served "
                                 f"{spec.model_type} base has {what.format(expected)} (expected [{spec.num_layers}, N, "
                                 f"{spec.num_kv_heads}, {spec.head_dim}])")
        if t.shape[1] < 1:
            raise DeltaError(f"prompt.{name}: shape {tuple(t.shape)} holds no virtual tokens")
    if part.keys.shape != part.values.shape:
        raise DeltaError(f"prompt: keys {tuple(part.keys.shape)} and values {tuple(part.values.shape)} differ in shape")
