"""DoRA's column scale on the CPU backend: ``y[t] = y[t] * scale[s] + shift[s]`` for flagged slots only.

Only the flagged slots' tokens are read or written: a slice per run while runs are few (prefill), else
one gather of exactly those tokens (from the slot-sorted segments). Tokens of other slots are not
touched at all, so they pay nothing and keep their values bit for bit.
"""
from __future__ import annotations

import torch

from ..meta import DeltaKernelMeta
from .rows import ROWS_MAX_RUNS
from .threads import on_op_threads


def _affine(y: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> None:
    """y = y * g + c in place, computed in fp32 and rounded once to y's dtype."""
    if y.dtype == torch.float32:
        y.mul_(g).add_(c)
    else:
        y.copy_(y.float().mul_(g.float()).add_(c.float()))


@on_op_threads
def cpu_scale_shift_rows(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, flag: torch.Tensor,
                         meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.scale_shift_rows`` (which checks the arguments; semantics there)."""
    if meta.no_delta:
        return
    flags = flag.tolist()
    work = [k for k, s in enumerate(meta.active_slots_host) if flags[s]]
    if not work:
        return
    runs = [(a, b, s) for a, b, s in meta.runs_host if flags[s]]
    if len(runs) <= ROWS_MAX_RUNS:
        for a, b, s in runs:
            _affine(y[a:b], scale[s], shift[s])
        return
    starts = meta.seg_start_host
    ids = torch.cat([meta.sorted_active_ids[starts[k]:starts[k + 1]] for k in work])  # [n] flagged tokens
    slots = torch.tensor([meta.active_slots_host[k] for k in work for _ in range(starts[k + 1] - starts[k])],
                         dtype=torch.int64, device=y.device)  # [n]
    rows = y.index_select(0, ids).float()  # [n, out]
    rows.mul_(scale.index_select(0, slots).float()).add_(shift.index_select(0, slots).float())
    y.index_copy_(0, ids, rows.to(y.dtype))
