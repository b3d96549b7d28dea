"""(IA)³ in Triton: learned per-slot vectors scale activations row-wise, ``t[i] *= vec[slot[i]]``.

PEFT applies (IA)³ to the output of k/v projections and to the *input* of feed-forward down
projections (``../shared/DELTAS.md`` §2.5); both are this one op on a different tensor (the base
output ``y`` after the base matmul, or the input ``x`` before it). The kernel is the BitFit
gathered row kernel with ``MULTIPLY`` (``bitfit.py``).
"""
from __future__ import annotations

import torch

from ._checks import check_rows_op
from ._triton import require_triton
from .bitfit import launch_rowwise
from .meta import DeltaKernelMeta


def mul_rows(t: torch.Tensor, vec: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """Semantics: t[i] *= vec[slot[i]] for slot[i] >= 0.   t [T, n] (in place), vec [S, n]."""
    check_rows_op("mul_rows", "t", t, "vec", vec, meta)
    launch_mul_rows(t, vec, meta)


def launch_mul_rows(t, vec, meta) -> None:
    """mul_rows without the argument checks (the dispatcher has done them)."""
    require_triton(t, "mul_rows")
    if not meta.no_delta:
        launch_rowwise(t, vec, meta, multiply=True)
