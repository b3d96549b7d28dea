"""Heterogeneous delta ops for one batched forward pass: LoRA, bottleneck adapters, BitFit, (IA)3.

Public surface (docs/INTERFACES.md, section kernels/)::

    meta = DeltaKernelMeta.build(token_slots, token_slots_host=None, buffers=None)   # once per step
    add_lora(y, x, LoraPages(...), meta)
    add_bottleneck(y, u, AdapterPages(...), meta)
    add_bias(y, RowPages(...), meta)
    mul_rows(t, RowPages(...), meta)

The pages (``pages.py``) say where each slot's weights are: row tensors and one int32 row index per slot
(D13), never pointers; the ops do not care where the rows live.

These four functions are the only entry points of the ops. Each checks its arguments once (ValueError
naming the argument and its shape; ``_checks.py``), then runs one backend, mutates its first argument
and returns None. Each op comes in three parts:

    Triton kernel + launcher   lora.py, bottleneck.py, rows.py   triton_add_lora, triton_add_bottleneck,
                                                                 triton_add_bias, triton_mul_rows
    CPU backend (pure torch)   cpu/                              cpu_add_lora, cpu_add_bottleneck,
                                                                 cpu_add_bias, cpu_mul_rows
    exact reference (float64)  reference.py                      ref_add_lora, ref_add_bottleneck,
                                                                 ref_add_bias, ref_mul_rows

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
from ._checks import check_bottleneck, check_lora, check_rows_op
from ._triton import HAS_TRITON, INTERPRET, use_triton
from .activations import ACT_CODES
from .meta import DeltaKernelMeta, MetaBuffers
from .pages import AdapterPages, LoraPages, RowPages

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
    from . import bottleneck, lora, rows

    return lora, bottleneck, rows


def add_lora(y, x, pages: LoraPages, meta) -> None:
    """For every token t with s = slot[t] >= 0 and r = pages.rank[s] > 0, with A_s and B_s the r rows of
    ``pages`` from ``pages.start[s]``:  y[t] += scale[s] * (x[t] @ A_s.T) @ B_s.T
    y [T, out] (in place), x [T, in]; shapes in ``kernels.LoraPages``."""
    check_lora(y, x, pages, meta)
    if current_backend(y) == "triton":
        _triton()[0].triton_add_lora(y, x, pages, meta)
    else:
        cpu.cpu_add_lora(y, x, pages, meta)


def add_bottleneck(y, u, pages: AdapterPages, meta) -> None:
    """For every token t with s = slot[t] >= 0 and m = pages.width[s] > 0 (``kernels.AdapterPages``):
        y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s)
    y, u [T, h]; ``u`` may be ``y``."""
    check_bottleneck(y, u, pages, meta)
    if current_backend(y) == "triton":
        _triton()[1].triton_add_bottleneck(y, u, pages, meta)
    else:
        cpu.cpu_add_bottleneck(y, u, pages, meta)


def add_bias(y, pages: RowPages, meta) -> None:
    """y[t] += pages.rows[pages.row[slot[t]]] for slot[t] >= 0.  y [T, out], rows [N, out]."""
    check_rows_op("add_bias", "y", y, pages, meta)
    if current_backend(y) == "triton":
        _triton()[2].triton_add_bias(y, pages, meta)
    else:
        cpu.cpu_add_bias(y, pages, meta)


def mul_rows(t, pages: RowPages, meta) -> None:
    """t[i] *= pages.rows[pages.row[slot[i]]] for slot[i] >= 0.  t [T, n], rows [N, n]."""
    check_rows_op("mul_rows", "t", t, pages, meta)
    if current_backend(t) == "triton":
        _triton()[2].triton_mul_rows(t, pages, meta)
    else:
        cpu.cpu_mul_rows(t, pages, meta)


__all__ = ["ACT_CODES", "BACKENDS", "AdapterPages", "DeltaKernelMeta", "HAS_TRITON", "LoraPages", "MetaBuffers",
           "RowPages", "add_bias", "add_bottleneck", "add_lora", "backend", "cpu", "current_backend", "mul_rows",
           "use_triton"]
