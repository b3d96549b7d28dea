"""DoRA's column scale on the CPU backend: ``y[t] = y[t] * scale[s] + shift[s]`` for flagged slots only.

Only the flagged slots' tokens are read or written, in one fused pass: at decode one C loop over them
(``looped.native_affine``, fp32 with the native loops built: the gather below is five torch ops, 1.5x a rank-16
LoRA op's time once that runs natively too), else ``addcmul``: a slice per run
while the flagged runs are few (ROWS_MAX_RUNS) or average RUN_MIN_TOKENS tokens (prefill: one run per
sequence, no gather), else one gather of exactly those tokens (decode with many DoRA requests). Tokens of
other slots are not touched at all, so they pay nothing and keep their values bit for bit. The pass is
memory-bound: on 2048 x 1024 fp32 rows it costs ~1 ms on one core of the CPU benchmark machine, about a
fifth of a rank-16 LoRA op there (the Triton expand epilogue is where it would fold in for free).
"""
from __future__ import annotations

import torch

from ..meta import DeltaKernelMeta
from ..pages import ScaleShiftPages
from . import looped
from .gather import token_ids
from .plans import RUN_MIN_TOKENS
from .rows import ROWS_MAX_RUNS, decode_shaped
from .threads import on_op_threads


def _affine(y: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> None:
    """y = y * g + c in place (g, c fp32 [n] or [rows, n]), computed in fp32 and rounded once to y's dtype."""
    if y.dtype == torch.float32:
        torch.addcmul(c, y, g, out=y)
    else:
        y.copy_(torch.addcmul(c, y.float(), g))


@on_op_threads
def cpu_scale_shift_rows(y: torch.Tensor, pages: ScaleShiftPages, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.scale_shift_rows`` (which checks the arguments; semantics there)."""
    if meta.no_delta:
        return
    if decode_shaped(meta) and looped.usable_with(pages, ("scale_rows", "shift_rows"), y):
        looped.native_affine(y, pages, meta)  # the loop reads the flags and rows itself
        return
    flags, row = pages.flag.tolist(), pages.row.tolist()
    scale, shift = pages.scale_rows, pages.shift_rows
    if not any(flags[s] for s in meta.active_slots_host):
        return
    runs = [(a, b, s) for a, b, s in meta.runs_host if flags[s]]
    if len(runs) <= ROWS_MAX_RUNS or sum(b - a for a, b, _ in runs) >= RUN_MIN_TOKENS * len(runs):
        for a, b, s in runs:
            _affine(y[a:b], scale[row[s]], shift[row[s]])
        return
    if len(runs) == len(meta.runs_host):  # every active token is flagged: the shared token-order indices
        ids, slots = token_ids(meta), meta.active_token_slots  # None = every token; [N] int64
    else:  # a few flagged tokens among others (decode): their ids from the host runs, no device mask
        ids = torch.tensor([i for a, b, _ in runs for i in range(a, b)], dtype=torch.int64, device=y.device)
        slots = torch.tensor([s for a, b, s in runs for _ in range(a, b)], dtype=torch.int64, device=y.device)
    rows_of = pages.row.to(torch.int64).index_select(0, slots)  # [n] each token's row
    g, c = scale.index_select(0, rows_of), shift.index_select(0, rows_of)  # [n, out] fp32
    if ids is None:
        _affine(y, g, c)
    else:
        rows = y.index_select(0, ids)
        _affine(rows, g, c)
        y.index_copy_(0, ids, rows)
