"""Bottleneck adapters (Houlsby / Pfeiffer / parallel) in Triton, on the LoRA tiling (``lora.py``).

    y[t] += scale[s] * (act_s(u[t] @ down[s, :m].T + down_bias[s, :m]) @ up[s, :, :m].T + up_bias[s])

The down-projection is the LoRA shrink with the bias and the slot's activation in its epilogue
(``../shared/ANCHORS.md`` §4.7: the nonlinearity sits between shrink and expand); the
up-projection is the LoRA expand with the up bias added before ``scale``. Width is bounded per
slot exactly like LoRA rank (D3). Because the shrink writes its whole fp32 result before the
expand launches, ``u`` may be ``y`` itself (the "output" placement: the adapter reads the sublayer
output it adds to).
"""
from __future__ import annotations

import torch

from ._checks import check_bottleneck
from ._triton import require_triton
from .lora import expand, shrink
from .meta import DeltaKernelMeta


def add_bottleneck(y: torch.Tensor, u: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor,
                   up_bias: torch.Tensor, scale: torch.Tensor, width: torch.Tensor, act: torch.Tensor,
                   meta: DeltaKernelMeta) -> None:
    """y [T, h] (in place), u [T, h], down [S, M, h], down_bias [S, M], up [S, h, M], up_bias [S, h],
    scale fp32 [S], width int32 [S] (0 = no adapter at this layer), act int32 [S] (ACT_CODES)."""
    check_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)
    launch_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)


def launch_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta) -> None:
    """add_bottleneck without the argument checks (the dispatcher has done them)."""
    require_triton(y, "add_bottleneck")
    if meta.no_delta:
        return
    h = shrink(u, down, width, meta, w_bias=down_bias, act=act)  # [N, M] fp32, activated
    expand(y, h, up, scale, width, meta, w_bias=up_bias)
