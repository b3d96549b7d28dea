"""The bottleneck adapters' activations: one code per activation, shared by every backend.

The ``act`` pool of ``add_bottleneck`` holds these codes (int32, one per slot). The Triton kernels
compute them in ``lora._activation`` (same numbering); the CPU backend and the exact reference use the
torch functions below (the reference on float64 tensors).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_new": 2, "silu": 3}
"""Activation name -> code: exact erf GELU is ``gelu``, the tanh approximation is ``gelu_new`` (the
names of transformers' ``ACT2FN``, which AdapterHub and OpenDelta configs use)."""

ACT_FNS = {
    ACT_CODES["relu"]: torch.relu,
    ACT_CODES["gelu"]: functools.partial(F.gelu, approximate="none"),
    ACT_CODES["gelu_new"]: functools.partial(F.gelu, approximate="tanh"),
    ACT_CODES["silu"]: F.silu,
}
"""Code -> torch function, for any floating dtype."""
