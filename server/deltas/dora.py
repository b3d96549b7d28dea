"""DoraPool: the per-slot DoRA column scale of one wrapped linear layer.

A DoRA delta serves as ``y = g * (x W^T + s x A^T B^T) + b0`` (``delta_store/dora.py``): its LoRA term
goes into the layer's LoRA pools like any other, and after the LoRA add one row op on the DoRA slots'
tokens only (``kernels.scale_shift_rows``) turns ``base(x) + lora(x)`` into ``y * g + (1 - g) * b0``.
``g = m / ||W + s B A||`` needs the base weight, so it is computed here, at load, from the factors
(no ``B @ A``) with ``||W_o||^2`` cached once per layer.

Pools, allocated on the module's first DoRA delta (load path), fp32 whatever the model dtype (g
multiplies the whole output; a bf16 g would move every logit by ~0.4%)::

    scale [S, out] (1 for other slots)   shift [S, out] ((1 - g) * b0; 0 without a base bias)   flag [S] int32
"""
from __future__ import annotations

import torch

from delta_store.dora import base_row_sq, dora_scale
from delta_store.delta import ModuleDelta
from delta_store.errors import DeltaError


class DoraPool(torch.nn.Module):
    def __init__(self, max_slots: int, out_features: int, device):
        super().__init__()
        S, kw = max_slots, dict(device=device, dtype=torch.float32)
        self.register_buffer("scale", torch.ones(S, out_features, **kw), persistent=False)  # [S, out]
        self.register_buffer("shift", torch.zeros(S, out_features, **kw), persistent=False)  # [S, out]
        self.register_buffer("flag", torch.zeros(S, dtype=torch.int32, device=device), persistent=False)  # [S]
        self.base_sq: torch.Tensor | None = None  # ||W_o||^2 [out], on first use

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.inference_mode()
    def set(self, slot: int, weight: torch.Tensor, bias: torch.Tensor | None, md: ModuleDelta, where: str) -> None:
        """weight: the base weight as [out, in]; bias: the base bias [out] or None."""
        if self.base_sq is None:
            self.base_sq = base_row_sq(weight)
        g = dora_scale(weight, md.lora, md.dora_magnitude, base_sq=self.base_sq, where=where)  # [out] fp32+
        self.scale[slot].copy_(g)
        if bias is not None:
            self.shift[slot].copy_((1.0 - g) * bias.to(g.dtype))
        else:
            self.shift[slot].zero_()
        self.flag[slot] = 1

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        self.scale[slot].fill_(1.0)
        self.shift[slot].zero_()
        self.flag[slot] = 0


def check_dora(md: ModuleDelta, out_features: int, path: str) -> None:
    if md.lora is None:
        raise DeltaError(f"{path}: a DoRA magnitude needs the module's LoRA term")
    if tuple(md.dora_magnitude.shape) != (out_features,):
        raise DeltaError(f"{path}: DoRA magnitude expected shape ({out_features},), found "
                         f"{tuple(md.dora_magnitude.shape)}")
    if md.in_scale is not None or md.out_scale is not None or md.adapter is not None:
        raise DeltaError(f"{path}: DoRA combines only with LoRA and bias terms on one module")
