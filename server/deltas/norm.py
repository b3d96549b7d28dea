"""DeltaNorm: a wrapped LayerNorm/RMSNorm that feeds residual adapters and carries BitFit bias deltas.

Two jobs, both per step and both free when no delta is active:

* At a residual site (Llama ``input_layernorm``/``post_attention_layernorm``, GPT-2 ``ln_1``/``ln_2``) its
  input is ``h``, the residual stream entering the sub-block. It hands that tensor *by reference* to
  the site's output module through a :class:`ResidualTap`, for Pfeiffer (``h + y``) and parallel
  (``h``) adapters (docs/DELTAS.md §3.4). Pre-LN blocks build ``h + a`` as a new tensor, so ``h`` is not
  overwritten before the adapter reads it.
* On a LayerNorm (GPT-2 ``ln_1``, ``ln_2``, ``ln_f``; OpenDelta gpt2-bitfit trains them) it adds a
  per-slot bias delta to the output: ``y = LN(x) + bias[slot]``. RMSNorm has no bias and no tool
  produces one (docs/DELTAS.md §5), so RMSNorm wrappers have no bias pool.
"""
from __future__ import annotations

import torch

import kernels
from delta_store.delta import ModuleDelta
from delta_store.errors import DeltaError

from .adapter import ResidualTap
from .batch import DeltaBatch


def norm_features(layer: torch.nn.Module) -> int:
    if isinstance(layer, torch.nn.LayerNorm):
        return int(layer.normalized_shape[-1])
    return int(layer.weight.shape[-1])


class DeltaNorm(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, batch: DeltaBatch, *, path: str, max_slots: int,
                 tap: ResidualTap | None = None):
        super().__init__()
        self.base = base
        self.batch = batch
        self.path = path
        self.tap = tap
        self.features = norm_features(base)
        self.has_bias_pool = isinstance(base, torch.nn.LayerNorm)
        self.has_bias = [False] * max_slots
        if self.has_bias_pool:
            w = base.weight
            self.register_buffer("bias_delta", torch.zeros(max_slots, self.features, device=w.device, dtype=w.dtype),
                                 persistent=False)  # [S, n]

    @classmethod
    def can_replace(cls, layer: torch.nn.Module) -> bool:
        return isinstance(layer, torch.nn.LayerNorm) or (type(layer).__name__.endswith("RMSNorm")
                                                         and isinstance(getattr(layer, "weight", None), torch.Tensor))

    @classmethod
    def from_layer(cls, layer: torch.nn.Module, batch: DeltaBatch, *, path: str, max_slots: int,
                   tap: ResidualTap | None = None) -> "DeltaNorm":
        return cls(layer, batch, path=path, max_slots=max_slots, tap=tap)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def check(self, md: ModuleDelta) -> None:
        extra = md.kinds() - {"bitfit"}
        if extra:
            raise DeltaError(f"{self.path}: a norm module carries only a bias delta, found {sorted(extra)}")
        if md.bias is None:
            return
        if not self.has_bias_pool:
            raise DeltaError(f"{self.path}: {type(self.base).__name__} has no bias; a bias delta cannot be served here")
        if tuple(md.bias.shape) != (self.features,):
            raise DeltaError(f"{self.path}: bias expected shape ({self.features},), found {tuple(md.bias.shape)}")

    @torch.inference_mode()
    def set_delta(self, slot: int, md: ModuleDelta) -> None:
        self.check(md)
        self.clear(slot)
        if md.bias is not None:
            self.bias_delta[slot].copy_(md.bias)
            self.has_bias[slot] = True

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        if self.has_bias_pool:
            self.bias_delta[slot].zero_()
        self.has_bias[slot] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        meta = self.batch.meta
        if meta.no_delta:
            return y
        if self.tap is not None:
            self.tap.h = x.reshape(-1, self.features)  # [num_tokens, hidden]; a view, no copy
            self.tap.normed = y.view(-1, self.features)  # its output (BitFit below lands in it too)
        if self.has_bias_pool and any(self.has_bias[s] for s in meta.active_slots_host):
            y2 = y.view(-1, self.features)  # [num_tokens, n]
            self.batch.check_tokens(y2.shape[0], self.path)
            kernels.add_bias(y2, self.bias_delta, meta)
        return y

    def extra_repr(self) -> str:
        return f"features={self.features}, bias_pool={self.has_bias_pool}, site={self.tap is not None}"
