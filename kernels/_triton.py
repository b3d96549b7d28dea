"""Decide once, at import, whether Triton can run here (as vLLM ``triton_utils`` does).

``HAS_TRITON`` is False when triton is missing (macOS, a stripped image): the kernel modules
still import, their launchers raise a clear error, and dispatch uses the CPU backend.
``TRITON_INTERPRET=1`` must be set before triton is first imported (transformers imports it
too), so it is read here once and never re-read.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _Placeholder:
        """Stands in for ``triton`` / ``tl`` so ``@triton.jit`` modules still import."""

        constexpr = int

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_a, **_kw):
            return lambda f: f

        @staticmethod
        def Config(*_a, **_kw):
            return None

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = _Placeholder()  # type: ignore[assignment]
    tl = _Placeholder()  # type: ignore[assignment]

DOT_MIN = 16
"""tl.dot needs M, N, K >= 16 on NVIDIA GPUs; the interpreter accepts less, so launchers enforce it."""


def use_triton(t: torch.Tensor) -> bool:
    """Triton can run on ``t``: triton is importable and ``t`` is on CUDA or the interpreter is on."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def require_triton(t: torch.Tensor, op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed; use the CPU backend (DELTASERVE_KERNELS=cpu)")
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(f"{op}: tensors on {t.device} need CUDA or TRITON_INTERPRET=1 set before triton "
                           "is imported; use the CPU backend (DELTASERVE_KERNELS=cpu)")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block(n: int, cap: int, floor: int = DOT_MIN) -> int:
    """A power-of-two tile covering ``n`` (capped at ``cap``), never below the tl.dot minimum."""
    return max(floor, min(cap, next_pow2(n)))
