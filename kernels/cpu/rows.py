"""BitFit and (IA)3 on the CPU backend: a slice per run of same-slot tokens when runs are few (prefill),
one gather otherwise (decode)."""
from __future__ import annotations

import torch

from ..meta import DeltaKernelMeta
from .gather import token_ids
from .tensors import add_rows, add_slice, f32
from .threads import on_op_threads

ROWS_MAX_RUNS = 8
"""Up to this many runs, slice per run; beyond, one gather does it."""


@on_op_threads
def cpu_add_bias(y: torch.Tensor, bias: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.add_bias`` (which checks the arguments): y[t] += bias[slot[t]]."""
    if meta.no_delta:
        return
    if len(meta.runs_host) <= ROWS_MAX_RUNS:
        for a, b, s in meta.runs_host:
            add_slice(y[a:b], f32(bias[s]), 1.0)
        return
    add_rows(y, token_ids(meta), f32(bias.index_select(0, meta.active_token_slots)))


@on_op_threads
def cpu_mul_rows(t: torch.Tensor, vec: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.mul_rows`` (which checks the arguments): t[i] *= vec[slot[i]]."""
    if meta.no_delta:
        return
    if len(meta.runs_host) <= ROWS_MAX_RUNS:
        for a, b, s in meta.runs_host:
            if t.dtype == torch.float32:
                t[a:b].mul_(vec[s])
            else:
                t[a:b].copy_(t[a:b].float().mul_(vec[s].float()))
        return
    rows = f32(vec.index_select(0, meta.active_token_slots))  # [N, n]
    ids = token_ids(meta)
    if ids is None:
        if t.dtype == torch.float32:
            t.mul_(rows)
        else:
            t.copy_(t.float().mul_(rows))
    else:
        t.index_copy_(0, ids, t.index_select(0, ids).float().mul_(rows).to(t.dtype))
