"""Heterogeneous delta ops for one batched forward pass: LoRA, bottleneck adapters, BitFit, (IA)3, DoRA's
column scale and trainable tokens.

Public surface (docs/INTERFACES.md, section kernels/)::

    meta = DeltaKernelMeta.build(token_slots, token_slots_host=None, buffers=None)   # once per step
    add_lora(y, x, lora_a, lora_b, scale, rank, meta)
    add_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)
    add_bias(y, bias, meta)
    mul_rows(t, vec, meta)
    scale_shift_rows(y, scale, shift, flag, meta)
    replace_rows(y, ids, index, values, count, meta)
    head_rows(logits, h, index, values, count, meta)

These seven functions are the only entry points of the ops. Each checks its arguments once (ValueError
naming the argument and its shape; ``_checks.py``), then runs one backend, mutates its first argument
and returns None. Each op comes in three parts:

    Triton kernel + launcher   lora.py, bottleneck.py, rows.py,  triton_add_lora, triton_add_bottleneck,
                               scale_shift.py, token_rows.py     triton_add_bias, triton_mul_rows,
                                                                 triton_scale_shift_rows, triton_replace_rows,
                                                                 triton_head_rows
    CPU backend (pure torch)   cpu/                              cpu_<op> for each
    exact reference (float64)  reference.py                      ref_<op> for each

The backend is decided once at import from ``DELTASERVE_KERNELS`` (auto | triton | cpu); ``auto`` runs
Triton on CUDA tensors or under ``TRITON_INTERPRET=1`` and the CPU backend otherwise (D5).
``backend(name)`` overrides it inside a ``with`` block. The exact reference is no backend: the tests
and benchmarks hold both backends to it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from . import cpu
from ._checks import (check_bottleneck, check_head_rows, check_lora, check_replace_rows, check_rows_op,
                      check_scale_shift)
from ._triton import HAS_TRITON, INTERPRET, use_triton
from .activations import ACT_CODES
from .meta import DeltaKernelMeta, MetaBuffers

BACKENDS = ("auto", "triton", "cpu")

_ENV_BACKEND = os.environ.get("DELTASERVE_KERNELS", "auto").strip().lower() or "auto"
if _ENV_BACKEND not in BACKENDS:
    raise ValueError(f"DELTASERVE_KERNELS={_ENV_BACKEND!r}: expected one of {', '.join(BACKENDS)}")

_overrides: list[str] = []


@contextmanager
def backend(name: str):
    """Run the ops inside the block on ``name`` (auto | triton | cpu): tests and benchmarks."""
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not one of {', '.join(BACKENDS)}")
    _overrides.append(name)
    try:
        yield
    finally:
        _overrides.pop()


def current_backend(t: torch.Tensor | None = None) -> str:
    """"triton" or "cpu": the backend an op on ``t`` would use now (``t`` None: a CUDA tensor if CUDA is
    available, else a CPU tensor)."""
    choice = _overrides[-1] if _overrides else _ENV_BACKEND
    if choice != "auto":
        return choice
    if t is not None:
        return "triton" if use_triton(t) else "cpu"
    return "triton" if HAS_TRITON and (INTERPRET or torch.cuda.is_available()) else "cpu"


def _triton():
    """The Triton modules, imported on first use: jit-decorating their kernels costs ~0.1 s."""
    from . import bottleneck, lora, rows, scale_shift, token_rows

    return lora, bottleneck, rows, scale_shift, token_rows


def add_lora(y, x, lora_a, lora_b, scale, rank, meta) -> None:
    """For every token t with s = slot[t] >= 0 and r = rank[s] > 0:
        y[t] += scale[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T
    y [T, out] (in place), x [T, in], lora_a [S, R, in], lora_b [S, out, R], scale fp32 [S], rank int32 [S]
    (0 = no LoRA at this layer; values must not exceed R)."""
    check_lora(y, x, lora_a, lora_b, scale, rank, meta)
    if current_backend(y) == "triton":
        _triton()[0].triton_add_lora(y, x, lora_a, lora_b, scale, rank, meta)
    else:
        cpu.cpu_add_lora(y, x, lora_a, lora_b, scale, rank, meta)


def add_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta) -> None:
    """For every token t with s = slot[t] >= 0 and m = width[s] > 0:
        y[t] += scale[s] * (act_s(u[t] @ down[s, :m].T + down_bias[s, :m]) @ up[s, :, :m].T + up_bias[s])
    y, u [T, h]; down [S, M, h], down_bias [S, M], up [S, h, M], up_bias [S, h], scale fp32 [S],
    width int32 [S] (0 = no adapter at this layer), act int32 [S] (ACT_CODES). ``u`` may be ``y``."""
    check_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)
    if current_backend(y) == "triton":
        _triton()[1].triton_add_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)
    else:
        cpu.cpu_add_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta)


def add_bias(y, bias, meta) -> None:
    """y[t] += bias[slot[t]] for slot[t] >= 0.  y [T, out], bias [S, out]."""
    check_rows_op("add_bias", "y", y, "bias", bias, meta)
    if current_backend(y) == "triton":
        _triton()[2].triton_add_bias(y, bias, meta)
    else:
        cpu.cpu_add_bias(y, bias, meta)


def mul_rows(t, vec, meta) -> None:
    """t[i] *= vec[slot[i]] for slot[i] >= 0.  t [T, n], vec [S, n]."""
    check_rows_op("mul_rows", "t", t, "vec", vec, meta)
    if current_backend(t) == "triton":
        _triton()[2].triton_mul_rows(t, vec, meta)
    else:
        cpu.cpu_mul_rows(t, vec, meta)


def scale_shift_rows(y, scale, shift, flag, meta) -> None:
    """y[t] = y[t] * scale[s] + shift[s] for tokens whose slot s = slot[t] >= 0 has flag[s] != 0; every other
    token is left untouched (DoRA's column scale: scale = g, shift = (1 - g) * b0).  y [T, n], scale and
    shift fp32 [S, n], flag int32 [S]."""
    check_scale_shift(y, scale, shift, flag, meta)
    if current_backend(y) == "triton":
        _triton()[3].triton_scale_shift_rows(y, scale, shift, flag, meta)
    else:
        cpu.cpu_scale_shift_rows(y, scale, shift, flag, meta)


def replace_rows(y, ids, index, values, count, meta) -> None:
    """y[t] = values[s, j] when ids[t] == index[s, j] for some j < count[s], s = slot[t] >= 0 (trainable tokens on
    the input embedding: the rows replace).  y [T, h], ids int64 [T], index int64 [S, R] (distinct ids per
    slot), values [S, R, h], count int32 [S]."""
    check_replace_rows(y, ids, index, values, count, meta)
    if current_backend(y) == "triton":
        _triton()[4].triton_replace_rows(y, ids, index, values, count, meta)
    else:
        cpu.cpu_replace_rows(y, ids, index, values, count, meta)


def head_rows(logits, h, index, values, count, meta) -> None:
    """logits[t, index[s, j]] = h[t] . values[s, j] for j < count[s], s = slot[t] >= 0 (trainable tokens on the
    output head).  logits [T, V], h [T, H], index int64 [S, R], values [S, R, H], count int32 [S]."""
    check_head_rows(logits, h, index, values, count, meta)
    if current_backend(logits) == "triton":
        _triton()[4].triton_head_rows(logits, h, index, values, count, meta)
    else:
        cpu.cpu_head_rows(logits, h, index, values, count, meta)


__all__ = ["ACT_CODES", "BACKENDS", "DeltaKernelMeta", "HAS_TRITON", "MetaBuffers", "add_bias", "add_bottleneck",
           "add_lora", "backend", "cpu", "current_backend", "head_rows", "mul_rows", "replace_rows",
           "scale_shift_rows", "use_triton"]
