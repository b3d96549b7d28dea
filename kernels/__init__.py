"""Heterogeneous delta ops for one batched forward pass: LoRA, bottleneck adapters, BitFit, (IA)3, DoRA's
column scale and trainable tokens.

Public surface (docs/INTERFACES.md, section kernels/)::

    meta = DeltaKernelMeta.build(token_slots, token_slots_host=None, buffers=None)   # once per step
    add_lora(y, x, LoraPages(...), meta)
    shrink_lora(x, PackedLoraPages(...), meta).add_to(y_m, m)    # siblings on one input: one shared shrink
    add_bottleneck(y, u, AdapterPages(...), meta)
    add_bias(y, RowPages(...), meta)
    mul_rows(t, RowPages(...), meta)
    scale_shift_rows(y, ScaleShiftPages(...), meta)
    replace_rows(y, ids, TokenPages(...), meta)
    head_rows(logits, h, TokenPages(...), meta)

The pages (``pages.py``) say where each slot's weights are: row tensors and one int32 row index per slot
(D13), never pointers; the ops do not care where the rows live.

These eight functions are the only entry points of the ops. Each checks its arguments once (ValueError
naming the argument and its shape; ``_checks.py``), then runs one backend, mutates its first argument
and returns None. Each op comes in three parts:

    Triton kernel + launcher   lora.py, packed.py, bottleneck.py, triton_add_lora, triton_shrink_lora,
                               rows.py,                          triton_add_bottleneck,
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
from ._checks import (check_bottleneck, check_head_rows, check_lora, check_lora_expand, check_lora_packed,
                      check_replace_rows, check_rows_op, check_scale_shift)
from ._triton import HAS_TRITON, INTERPRET, use_triton
from .activations import ACT_CODES
from .meta import DeltaKernelMeta, MetaBuffers
from .pages import AdapterPages, LoraPages, ModuleTerms, PackedLoraPages, RowPages, ScaleShiftPages, TokenPages

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


def add_lora(y, x, pages: LoraPages, meta) -> None:
    """For every token t with s = slot[t] >= 0 and r = pages.rank[s] > 0, with A_s and B_s the r rows of
    ``pages`` from ``pages.start[s]``:  y[t] += scale[s] * (x[t] @ A_s.T) @ B_s.T
    y [T, out] (in place), x [T, in]; shapes in ``kernels.LoraPages``."""
    check_lora(y, x, pages, meta)
    if current_backend(y) == "triton":
        _triton()[0].triton_add_lora(y, x, pages, meta)
    else:
        cpu.cpu_add_lora(y, x, pages, meta)


class LoraShrink:
    """The shared shrink of one ``shrink_lora`` call; ``add_to(y, m)`` adds member m's LoRA into its output ``y``
    [T, out_m] (in place), on the backend that ran the shrink. Valid for the x, pages and meta of that call."""

    __slots__ = ("_impl", "_pages", "_meta")

    def __init__(self, impl, pages: PackedLoraPages, meta):
        self._impl, self._pages, self._meta = impl, pages, meta

    def add_to(self, y, member: int) -> None:
        """y[t] += scale_m[s] * (x[t] @ A_m,s.T) @ B_m,s.T: ``add_lora(y, x, pages.members[member], meta)``."""
        check_lora_expand(y, self._pages, self._meta, member)
        self._impl.add_to(y, member)


def shrink_lora(x, pages: PackedLoraPages, meta) -> LoraShrink:
    """The LoRA shrink of sibling projections reading the same input ``x`` [T, in], as one operation over each
    slot's stack of A rows (``kernels.PackedLoraPages``): fp32 ``h_s = x[t] @ stack_s.T``; each member then adds
    its expand with ``.add_to(y_m, m)``. Equal to ``add_lora(y_m, x, pages.members[m], meta)`` for every member."""
    check_lora_packed(x, pages, meta)
    if current_backend(x) == "triton":
        from . import packed

        return LoraShrink(packed.triton_shrink_lora(x, pages, meta), pages, meta)
    return LoraShrink(cpu.cpu_shrink_lora(x, pages, meta), pages, meta)


def add_bottleneck(y, u, pages: AdapterPages, meta) -> None:
    """For every token t with s = slot[t] >= 0 and m = pages.width[s] > 0 (``kernels.AdapterPages``):
        y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s)
    y, u [T, h]; ``u`` may be ``y``."""
    check_bottleneck(y, u, pages, meta)
    if current_backend(y) == "triton":
        _triton()[1].triton_add_bottleneck(y, u, pages, meta)
    else:
        cpu.cpu_add_bottleneck(y, u, pages, meta)


def skips_neutral(t, meta) -> bool:
    """Whether ``add_bias`` / ``mul_rows`` on ``t`` with ``meta`` leave the tokens whose row is the pages' ``neutral``
    row untouched by themselves (the CPU native plan at decode): a caller whose other slots all point at that row may
    pass the step's meta as is instead of one restricted to the slots with the term. Either way the result is exact
    (adding the zero row or scaling by the ones row changes no value); this only saves the restricted meta."""
    return current_backend(t) == "cpu" and cpu.rows.skips_neutral(t, meta)


def step_ops(meta, t):
    """The ops of ``meta``'s step bound to it (``kernels.cpu.native_step.NativeStep``: ``add_lora(y, x, pages)``,
    ``add_bottleneck``, ``add_bias``, ``mul_rows``, ``scale_shift_rows``, and ``apply_terms(y, x, ModuleTerms)``: a
    module's terms in one call), for activations like ``t``: where the CPU
    backend's native plan serves the whole step (fp32 decode, no autograd), each call checks only its activations and
    runs one C loop; equal to the ops above. None elsewhere: call those."""
    if t.dtype != torch.float32 or current_backend(t) != "cpu":
        return None
    return cpu.native_step.native_step(meta)


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


def scale_shift_rows(y, pages: ScaleShiftPages, meta) -> None:
    """y[t] = y[t] * scale_s + shift_s for tokens whose slot s = slot[t] >= 0 has pages.flag[s] != 0, with
    scale_s / shift_s the rows ``pages.row[s]`` of ``pages.scale_rows`` / ``pages.shift_rows``; every other
    token is left untouched (DoRA's column scale: scale = g, shift = (1 - g) * b0).  y [T, n]."""
    check_scale_shift(y, pages, meta)
    if current_backend(y) == "triton":
        _triton()[3].triton_scale_shift_rows(y, pages, meta)
    else:
        cpu.cpu_scale_shift_rows(y, pages, meta)


def replace_rows(y, ids, pages: TokenPages, meta) -> None:
    """y[t] = V_s[j] when ids[t] == I_s[j] for some j < count[s], s = slot[t] >= 0, with V_s / I_s the slot's
    runs of ``pages.values`` / ``pages.ids`` (trainable tokens on the input embedding: the rows replace).
    y [T, h], ids int64 [T]; the ids of one slot are distinct."""
    check_replace_rows(y, ids, pages, meta)
    if current_backend(y) == "triton":
        _triton()[4].triton_replace_rows(y, ids, pages, meta)
    else:
        cpu.cpu_replace_rows(y, ids, pages, meta)


def head_rows(logits, h, pages: TokenPages, meta) -> None:
    """logits[t, I_s[j]] = h[t] . V_s[j] for j < count[s], s = slot[t] >= 0 (trainable tokens on the output
    head; V_s / I_s as in ``replace_rows``).  logits [T, V], h [T, H]."""
    check_head_rows(logits, h, pages, meta)
    if current_backend(logits) == "triton":
        _triton()[4].triton_head_rows(logits, h, pages, meta)
    else:
        cpu.cpu_head_rows(logits, h, pages, meta)


__all__ = ["ACT_CODES", "AdapterPages", "BACKENDS", "DeltaKernelMeta", "HAS_TRITON", "LoraPages",
           "LoraShrink", "MetaBuffers", "ModuleTerms", "PackedLoraPages", "RowPages", "ScaleShiftPages",
           "TokenPages", "add_bias", "add_bottleneck", "add_lora", "backend", "cpu", "current_backend",
           "head_rows", "mul_rows", "replace_rows", "scale_shift_rows", "shrink_lora", "skips_neutral",
           "step_ops", "use_triton"]
