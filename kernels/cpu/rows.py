"""BitFit and (IA)3 on the CPU backend: at decode (``decode_shaped``) one C loop over the tokens where the native loops
are built and the tensors fp32 (``looped.native_rows``: a bias add of 32 tokens of 32 slots was three torch ops,
~40-60 us a wrapped module); otherwise a slice per run of same-slot tokens when runs are few (prefill), one gather
beyond."""
from __future__ import annotations

import torch

from ..meta import DeltaKernelMeta
from ..pages import RowPages
from . import looped
from .gather import active_values, token_ids
from .tensors import add_rows, add_slice, f32
from .threads import on_op_threads

ROWS_MAX_RUNS = 8
"""Up to this many runs, slice per run; beyond, one gather does it."""


def _token_rows(pages: RowPages, meta: DeltaKernelMeta) -> torch.Tensor:
    """The row of every active token, [N, n] in token order (one gather of the slots' row indices)."""
    return pages.rows.index_select(0, pages.row.index_select(0, meta.active_token_slots).long())


def decode_shaped(meta: DeltaKernelMeta) -> bool:
    """Decode-shaped: several runs, one shorter than ``looped.LONG_RUN`` tokens. One C call then replaces a slice add
    per run (a BitFit of 6 of a step's 32 deltas: 6 adds of ~2-5 us) or the gather's three ops; the long runs of such
    a step (prefill chunks) keep their slice each (``looped.native_rows``), and a prefill alone keeps its slices."""
    return len(meta.runs_host) > 1 and meta.shortest_run < looped.LONG_RUN


def skips_neutral(t: torch.Tensor, meta: DeltaKernelMeta) -> bool:
    """Whether the row ops on ``t`` with ``meta`` take the native loop, which skips tokens on the pages' neutral row
    (``kernels.skips_neutral``); the pages' own tensors are fp32 CPU rows like ``t`` wherever a layer made them."""
    return decode_shaped(meta) and looped.usable(t)


@on_op_threads
def cpu_add_bias(y: torch.Tensor, pages: RowPages, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.add_bias`` (which checks the arguments): y[t] += rows[row[slot[t]]]."""
    if meta.no_delta:
        return
    if decode_shaped(meta) and looped.usable_with(pages, ("rows",), y):
        looped.native_rows(y, pages, meta, 0)
        return
    if len(meta.runs_host) <= ROWS_MAX_RUNS:
        rows = active_values(pages, "row", meta)
        for a, b, s in meta.runs_host:
            add_slice(y[a:b], f32(pages.rows[rows[s]]), 1.0)
        return
    add_rows(y, token_ids(meta), f32(_token_rows(pages, meta)))


@on_op_threads
def cpu_mul_rows(t: torch.Tensor, pages: RowPages, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.mul_rows`` (which checks the arguments): t[i] *= rows[row[slot[i]]]."""
    if meta.no_delta:
        return
    if decode_shaped(meta) and looped.usable_with(pages, ("rows",), t):
        looped.native_rows(t, pages, meta, 1)
        return
    if len(meta.runs_host) <= ROWS_MAX_RUNS:
        rows = active_values(pages, "row", meta)
        for a, b, s in meta.runs_host:
            v = pages.rows[rows[s]]
            if t.dtype == torch.float32:
                t[a:b].mul_(v)
            else:
                t[a:b].copy_(t[a:b].float().mul_(v.float()))
        return
    vals = f32(_token_rows(pages, meta))  # [N, n]
    ids = token_ids(meta)
    if ids is None:
        if t.dtype == torch.float32:
            t.mul_(vals)
        else:
            t.copy_(t.float().mul_(vals))
    else:
        t.index_copy_(0, ids, t.index_select(0, ids).float().mul_(vals).to(t.dtype))
