"""Heterogeneous delta ops for one batched forward pass: LoRA, bottleneck adapters, BitFit, (IA)3.

Public surface (docs/INTERFACES.md, section kernels/)::

    meta = DeltaKernelMeta.build(token_slots, token_slots_host=None)   # once per step
    add_lora(y, x, lora_a, lora_b, scale, rank, meta)
    add_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)
    add_bias(y, bias, meta)
    mul_rows(t, vec, meta)

Every op checks its arguments (ValueError naming the argument and its shape), mutates its first
argument and returns None. The backend is decided once at import from ``DELTASERVE_KERNELS``
(auto | triton | reference); ``auto`` runs Triton on CUDA tensors or under ``TRITON_INTERPRET=1``
and the torch reference otherwise (D5). ``backend(name)`` overrides it inside a ``with`` block.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from . import reference
from ._checks import check_bottleneck, check_lora, check_rows_op
from ._triton import HAS_TRITON, INTERPRET, use_triton
from .meta import DeltaKernelMeta

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_new": 2, "silu": 3}
"""Bottleneck activation codes stored in the ``act`` pool: exact erf GELU is ``gelu``, the tanh
approximation is ``gelu_new``."""

BACKENDS = ("auto", "triton", "reference")

_ENV_BACKEND = os.environ.get("DELTASERVE_KERNELS", "auto").strip().lower() or "auto"
if _ENV_BACKEND not in BACKENDS:
    raise ValueError(f"DELTASERVE_KERNELS={_ENV_BACKEND!r}: expected one of {', '.join(BACKENDS)}")

_overrides: list[str] = []


@contextmanager
def backend(name: str):
    """Run the ops inside the block on ``name`` (auto | triton | reference): tests and benchmarks."""
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not one of {', '.join(BACKENDS)}")
    _overrides.append(name)
    try:
        yield
    finally:
        _overrides.pop()


def current_backend(t: torch.Tensor | None = None) -> str:
    """"triton" or "reference": the backend an op on ``t`` would use now (``t`` None: a CUDA tensor
    if CUDA is available, else a CPU tensor)."""
    choice = _overrides[-1] if _overrides else _ENV_BACKEND
    if choice != "auto":
        return choice
    if t is not None:
        return "triton" if use_triton(t) else "reference"
    return "triton" if HAS_TRITON and (INTERPRET or torch.cuda.is_available()) else "reference"


def _triton_ops():
    from . import bitfit, bottleneck, ia3, lora  # imported on first use: jit-decorating costs ~0.1 s

    return lora.launch_lora, bottleneck.launch_bottleneck, bitfit.launch_bias, ia3.launch_mul_rows


def add_lora(y, x, lora_a, lora_b, scale, rank, meta) -> None:
    """y[t] += scale[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T, s = slot[t], r = rank[s].
    Shapes: y [T, out], x [T, in], lora_a [S, R, in], lora_b [S, out, R], scale fp32 [S], rank int32 [S]."""
    check_lora(y, x, lora_a, lora_b, scale, rank, meta)
    fn = _triton_ops()[0] if current_backend(y) == "triton" else reference.add_lora
    fn(y, x, lora_a, lora_b, scale, rank, meta)


def add_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta) -> None:
    """y[t] += scale[s] * (act_s(u[t] @ down[s, :m].T + down_bias[s, :m]) @ up[s, :, :m].T + up_bias[s]),
    s = slot[t], m = width[s]. Shapes: y, u [T, h]; down [S, M, h], down_bias [S, M], up [S, h, M],
    up_bias [S, h], scale fp32 [S], width / act int32 [S]. ``u`` may be ``y``."""
    check_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)
    fn = _triton_ops()[1] if current_backend(y) == "triton" else reference.add_bottleneck
    fn(y, u, down, down_bias, up, up_bias, scale, width, act, meta)


def add_bias(y, bias, meta) -> None:
    """y[t] += bias[slot[t]].  y [T, out], bias [S, out]."""
    check_rows_op("add_bias", "y", y, "bias", bias, meta)
    fn = _triton_ops()[2] if current_backend(y) == "triton" else reference.add_bias
    fn(y, bias, meta)


def mul_rows(t, vec, meta) -> None:
    """t[i] *= vec[slot[i]].  t [T, n], vec [S, n]."""
    check_rows_op("mul_rows", "t", t, "vec", vec, meta)
    fn = _triton_ops()[3] if current_backend(t) == "triton" else reference.mul_rows
    fn(t, vec, meta)


__all__ = ["ACT_CODES", "BACKENDS", "DeltaKernelMeta", "HAS_TRITON", "add_bias", "add_bottleneck", "add_lora",
           "backend", "current_backend", "mul_rows", "reference", "use_triton"]
