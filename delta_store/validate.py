"""Validation of a canonical :class:`Delta` against the served base and the server's pool limits.

Every error is a :class:`DeltaError` (``BaseMismatch`` for another base's fingerprint) naming the
module, the expected and the found shape, so a tenant can fix the upload from the message alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .base_spec import BaseSpec, ModuleInfo
from .delta import ACTIVATIONS, ADAPTER_SOURCES, Delta
from .errors import BaseMismatch, DeltaError
from .validate_prompt import validate_prompt

_BIAS_KINDS = ("linear", "conv1d", "layernorm")  # RMSNorm has no bias to shift (docs/DELTAS.md §5)
_PROJ_KINDS = ("linear", "conv1d")


@dataclass(slots=True)
class Limits:
    """What a delta must fit. Defaults accept anything structurally valid (they are the upper bounds
    ``ServerConfig`` allows); the server passes its own, built in ``server/app.py`` ``store_config``.

    ``device_bytes`` / ``device_budget_bytes``: the server's measure of the device memory a delta would take
    once resident and its whole delta budget (0: no check). This module knows nothing of devices: the
    server hands its decision over as a function."""

    max_rank: int = 16384
    max_bottleneck: int = 16384
    max_token_rows: int = 65536  # replaced embedding rows (trainable tokens) of one module
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    max_tensor_bytes: int = 1 << 30  # one tensor; a 7B model's largest LoRA B at r=64 is ~3.5 MiB
    max_model_len: int = 0  # a prompt part's virtual tokens must leave room under it (0 = not checked)
    device_bytes: Callable[[Delta], int] | None = None
    device_budget_bytes: int = 0

    def __post_init__(self) -> None:
        if self.device_budget_bytes and self.device_bytes is None:
            raise ValueError("Limits.device_budget_bytes needs device_bytes, the measure it bounds")
        for name in ("max_rank", "max_bottleneck", "max_token_rows", "max_tensor_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_model_len, int) or isinstance(self.max_model_len, bool) or self.max_model_len < 0:
            raise ValueError(f"Limits.max_model_len must be a non-negative integer, got {self.max_model_len!r}")
        self.dtypes = tuple(self.dtypes)
        if not self.dtypes or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in self.dtypes):
            raise ValueError(f"Limits.dtypes must be a non-empty tuple of floating torch dtypes, got {self.dtypes!r}")


def _site_outputs(spec: BaseSpec, info: ModuleInfo) -> bool:
    """Whether ``info`` is the output module of a residual site (o_proj/down_proj, GPT-2 attn/mlp.c_proj)."""
    if info.layer is None:
        return False
    for _norm, leaf in spec.sites().values():
        site = spec.find(info.layer, leaf)
        if site is not None and site.path == info.path:
            return True
    return False


def _shape(t: torch.Tensor, want: tuple[int, ...], path: str, what: str) -> None:
    if tuple(t.shape) != want:
        raise DeltaError(f"{path}: {what} expected shape {want}, found {tuple(t.shape)}")


def validate(delta: Delta, spec: BaseSpec, limits: Limits | None = None) -> None:
    """Raise unless every term of ``delta`` fits ``spec`` and ``limits``; returns None when it does."""
    limits = limits or Limits()
    if delta.base_fingerprint and spec.fingerprint and delta.base_fingerprint != spec.fingerprint:
        raise BaseMismatch(f"delta was built for base {delta.base_fingerprint}, the served base is "
                           f"{spec.fingerprint}")
    if not delta.modules and delta.prompt is None:
        raise DeltaError("delta has no terms: nothing to serve (all-zero or empty payload)")
    if delta.prompt is not None:
        validate_prompt(delta.prompt, spec, dtypes=limits.dtypes, max_tensor_bytes=limits.max_tensor_bytes,
                        max_model_len=limits.max_model_len)
    for path, md in delta.modules.items():
        info = spec.modules.get(path)
        if info is None:
            raise DeltaError(f"{path}: not a module of the served {spec.model_type} base")
        for name, t in md.tensors().items():
            if name == "rows.index":  # token ids; checked with the rows below
                continue
            if not isinstance(t, torch.Tensor) or t.dtype not in limits.dtypes:
                raise DeltaError(f"{path}.{name}: dtype {getattr(t, 'dtype', type(t).__name__)} not allowed "
                                 f"(allowed: {', '.join(str(d) for d in limits.dtypes)})")
            nbytes = t.numel() * t.element_size()
            if nbytes > limits.max_tensor_bytes:
                raise DeltaError(f"{path}.{name}: {nbytes} bytes exceeds the per-tensor limit "
                                 f"{limits.max_tensor_bytes}")
        fin, fout = info.in_features, info.out_features
        if md.rows is not None:
            _rows(md, info, spec, path)
            if md.rows.count > limits.max_token_rows:
                raise DeltaError(f"{path}: {md.rows.count} trainable-token rows exceed the server's max_token_rows "
                                 f"{limits.max_token_rows}")
            continue
        if md.kinds() - {"bitfit"} and info.kind not in _PROJ_KINDS:
            raise DeltaError(f"{path}: a {info.kind} module only takes a bias delta, found "
                             f"{sorted(md.kinds() - {'bitfit'})}")
        if md.bias is not None:
            if info.kind not in _BIAS_KINDS:
                raise DeltaError(f"{path}: a {info.kind} module cannot take a bias delta")
            _shape(md.bias, (fout,), path, "bias")
        if md.out_scale is not None:
            _shape(md.out_scale, (fout,), path, "out_scale")
        if md.in_scale is not None:
            _shape(md.in_scale, (fin,), path, "in_scale")
        if md.lora is not None:
            lora, r = md.lora, md.lora.rank
            if lora.a.dim() != 2 or r < 1:
                raise DeltaError(f"{path}: lora.a expected shape (r, {fin}) with r >= 1, found {tuple(lora.a.shape)}")
            _shape(lora.a, (r, fin), path, "lora.a")
            _shape(lora.b, (fout, r), path, "lora.b")
            if r > limits.max_rank:
                raise DeltaError(f"{path}: LoRA rank {r} exceeds the server's max_rank {limits.max_rank}")
            if not math.isfinite(lora.scale):
                raise DeltaError(f"{path}: lora.scale {lora.scale} is not finite")
        if md.dora_magnitude is not None:
            _dora(md, fout, path)
        if md.adapter is not None:
            ad, m = md.adapter, md.adapter.width
            if ad.down.dim() != 2 or m < 1:
                raise DeltaError(f"{path}: adapter.down expected shape (m, {fout}) with m >= 1, "
                                 f"found {tuple(ad.down.shape)}")
            _shape(ad.down, (m, fout), path, "adapter.down")
            _shape(ad.down_bias, (m,), path, "adapter.down_bias")
            _shape(ad.up, (fout, m), path, "adapter.up")
            _shape(ad.up_bias, (fout,), path, "adapter.up_bias")
            if m > limits.max_bottleneck:
                raise DeltaError(f"{path}: adapter width {m} exceeds the server's max_bottleneck "
                                 f"{limits.max_bottleneck}")
            if ad.activation not in ACTIVATIONS:
                raise DeltaError(f"{path}: adapter activation {ad.activation!r} not one of {ACTIVATIONS}")
            if ad.source not in ADAPTER_SOURCES:
                raise DeltaError(f"{path}: adapter source {ad.source!r} not one of {ADAPTER_SOURCES}")
            if ad.source != "output" and not _site_outputs(spec, info):
                sites = ", ".join(leaf for _n, leaf in spec.sites().values())
                raise DeltaError(f"{path}: an adapter reading {ad.source!r} needs the residual stream, so it must "
                                 f"sit on a residual-site output module ({sites}), found {info.kind} {path}")
            if not math.isfinite(ad.scale):
                raise DeltaError(f"{path}: adapter.scale {ad.scale} is not finite")
    if limits.device_budget_bytes:
        _fits_budget(delta, limits)
    delta.check_finite()


def _fits_budget(delta: Delta, limits: Limits) -> None:
    """A delta that could never be resident, even alone, is refused now: never at serve time."""
    need = limits.device_bytes(delta)
    if need <= limits.device_budget_bytes:
        return
    tail = (f"the delta needs {need} bytes of device memory, more than the server's whole delta budget "
            f"delta_memory_bytes={limits.device_budget_bytes}")
    if not delta.modules:
        raise DeltaError(f"prompt part of {delta.num_virtual_tokens} virtual tokens: {tail}")
    path, md = max(delta.modules.items(), key=lambda kv: sum(t.numel() for t in kv[1].tensors().values()))
    what = (f"LoRA rank {md.lora.rank}" if md.lora is not None else
            f"adapter width {md.adapter.width}" if md.adapter is not None else
            f"{md.rows.count} token rows" if md.rows is not None else "its vectors")
    raise DeltaError(f"{path}: {what} (the largest of {len(delta.modules)} modules): {tail}")


def _dora(md, fout: int, path: str) -> None:
    if md.lora is None:
        raise DeltaError(f"{path}: a DoRA magnitude needs the module's LoRA term (its direction), found none")
    if md.in_scale is not None or md.out_scale is not None or md.adapter is not None:
        raise DeltaError(f"{path}: DoRA combines only with LoRA and bias terms on one module, found "
                         f"{sorted(md.kinds() - {'dora', 'lora', 'bitfit'})}")
    _shape(md.dora_magnitude, (fout,), path, "DoRA magnitude (one per output feature)")


def _rows(md, info: ModuleInfo, spec: BaseSpec, path: str) -> None:
    """Trainable-token rows: only on the input embedding or the output head, alone, distinct ids in the vocabulary."""
    if path not in (spec.input_embedding, spec.output_head):
        raise DeltaError(f"{path}: replacement token rows apply to the input embedding ({spec.input_embedding}) "
                         f"or the output head ({spec.output_head}) only")
    if md.kinds() != {"tokens"}:
        raise DeltaError(f"{path}: token rows cannot be combined with {sorted(md.kinds() - {'tokens'})} on one module")
    if path == spec.output_head and info.has_bias:
        raise DeltaError(f"{path}: the output head has a bias, which PEFT's trainable tokens drop for the replaced "
                         f"ids; not served")
    vocab, hidden = (info.in_features, info.out_features) if info.kind == "embedding" else \
        (info.out_features, info.in_features)
    index, values = md.rows.index, md.rows.values
    if index.dtype != torch.int64 or index.dim() != 1 or index.numel() < 1:
        raise DeltaError(f"{path}: rows.index must be a non-empty 1-D int64 tensor of token ids, found "
                         f"{index.dtype} {tuple(index.shape)}")
    _shape(values, (index.numel(), hidden), path, "rows.values")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise DeltaError(f"{path}: token index {bad} is outside the vocabulary [0, {vocab})")
    if torch.unique(index).numel() != index.numel():
        raise DeltaError(f"{path}: rows.index repeats a token id; each replaced row must be named once")
