"""Bottleneck adapters (Houlsby / Pfeiffer / parallel) in Triton, on the LoRA tiling (``lora.py``).

    y[t] += scale[s] * (act_s(u[t] @ down[s, :m].T + down_bias[s, :m]) @ up[s, :, :m].T + up_bias[s])

The down-projection is the LoRA shrink with the bias and the slot's activation in its epilogue (an
adapter is LoRA's shrink/expand pair with a nonlinearity between the two, so it belongs where the
shrink's fp32 result is still in registers); the up-projection is the LoRA expand with the up bias
added before ``scale``. Width is bounded per slot exactly like LoRA rank (D3). Because the shrink
writes its whole fp32 result before the expand launches, ``u`` may be ``y`` itself (the "output"
placement: the adapter reads the sublayer output it adds to).
"""
from __future__ import annotations

import torch

from ._triton import require_triton
from .lora import expand, shrink
from .meta import DeltaKernelMeta


def triton_add_bottleneck(y: torch.Tensor, u: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
                          up: torch.Tensor, up_bias: torch.Tensor, scale: torch.Tensor, width: torch.Tensor,
                          act: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.add_bottleneck`` (which checks the arguments; semantics and shapes
    there): the shrink with bias and activation into the fp32 ``h``, then the expand with the up bias."""
    require_triton(y, "add_bottleneck")
    if meta.no_delta:
        return
    h = shrink(u, down, width, meta, w_bias=down_bias, act=act)  # [N, M] fp32, activated
    expand(y, h, up, scale, width, meta, w_bias=up_bias)
