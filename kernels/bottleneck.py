"""Bottleneck adapters (Houlsby / Pfeiffer / parallel) in Triton, on the LoRA tiling (``lora.py``).

    y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s)      (kernels.AdapterPages: runs of width rows)

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
from .pages import AdapterPages


def triton_add_bottleneck(y: torch.Tensor, u: torch.Tensor, pages: AdapterPages, meta: DeltaKernelMeta) -> None:
    """The Triton backend of ``kernels.add_bottleneck`` (which checks the arguments; semantics and shapes
    there): the shrink with bias and activation into the fp32 ``h``, then the expand with the up bias."""
    require_triton(y, "add_bottleneck")
    if meta.skippable or pages.max_width == 0:
        return
    h = shrink(u, pages.down_rows, pages.start, pages.width, pages.max_width, meta, w_bias=pages.down_bias,
               act=pages.act)  # [N, M] fp32, activated
    expand(y, h, pages.up_rows, pages.start, pages.scale, pages.width, meta, up_bias=pages.up_bias_rows,
           up_bias_row=pages.up_bias_row)
