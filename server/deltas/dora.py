"""DoRA's column scale of one wrapped linear layer: its checks and its staged row.

A DoRA delta serves as ``y = g * (x W^T + s x A^T B^T) + b0`` (``delta_store/dora.py``): its LoRA term
takes the layer's LoRA rows like any other, and after the LoRA add one row op on the DoRA slots'
tokens only (``kernels.scale_shift_rows``) turns ``base(x) + lora(x)`` into ``y * g + (1 - g) * b0``.
``g = m / ||W + s B A||`` needs the base weight, so it is computed when the delta is staged (a load thread,
never the step loop), from the factors (no ``B @ A``) with ``||W_o||^2`` cached once per layer.

Storage (D13): one row of the layer's fp32 ``dora`` arena per resident DoRA delta, ``g | (1 - g) b0`` at
columns 0 and out_pad: ``2 * out * 4`` bytes, the delta's own size for its magnitude vector at fp32 (fp32
whatever the model dtype: g multiplies the whole output, and a bf16 g would move every logit by ~0.4%).
A slot without DoRA has ``dora_flag`` 0 and its row is never read, so the arena needs no neutral row.
"""
from __future__ import annotations

import torch

from delta_store.delta import ModuleDelta
from delta_store.dora import base_row_sq, dora_scale
from delta_store.errors import DeltaError


def check(md: ModuleDelta, out_features: int, path: str) -> None:
    if md.lora is None:
        raise DeltaError(f"{path}: a DoRA magnitude needs the module's LoRA term")
    if tuple(md.dora_magnitude.shape) != (out_features,):
        raise DeltaError(f"{path}: DoRA magnitude expected shape ({out_features},), found "
                         f"{tuple(md.dora_magnitude.shape)}")
    if md.in_scale is not None or md.out_scale is not None or md.adapter is not None:
        raise DeltaError(f"{path}: DoRA combines only with LoRA and bias terms on one module")


@torch.inference_mode()
def stage(weight: torch.Tensor, bias: torch.Tensor | None, md: ModuleDelta, path: str, width: int,
          base_sq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(host row fp32 [1, 2 * width]: g | (1 - g) b0, the layer's ``||W_o||^2`` for the next call).
    weight: the base weight as [out, in]; bias: the base bias [out] or None. A zero norm is a DeltaError."""
    if base_sq is None:
        base_sq = base_row_sq(weight)
    g = dora_scale(weight, md.lora, md.dora_magnitude, base_sq=base_sq, where=path)  # [out] fp32+
    out = g.shape[0]
    row = torch.zeros(1, 2 * width, dtype=torch.float32)
    row[0, :out] = g.float().cpu()
    if bias is not None:
        row[0, width:width + out] = ((1.0 - g) * bias.to(g.dtype)).float().cpu()
    return row, base_sq
