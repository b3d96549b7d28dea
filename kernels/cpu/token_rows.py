"""Trainable tokens on the CPU backend: replacement embedding rows and the head logits of those ids.

Per active slot with ``count[s] > 0`` (trainable-token deltas are few and their rows a handful), its
tokens (a run slice or its segment of the slot-sorted tokens) are matched against its ``count`` ids;
tokens of other slots are never touched.
"""
from __future__ import annotations

import torch

from ..meta import DeltaKernelMeta
from .tensors import f32
from .threads import on_op_threads


def _slot_tokens(meta: DeltaKernelMeta, k: int) -> torch.Tensor:
    """int64 token ids of the k-th active slot (its segment of the slot-sorted tokens)."""
    a, b = meta.seg_start_host[k], meta.seg_start_host[k + 1]
    return meta.sorted_active_ids[a:b]


@on_op_threads
def cpu_replace_rows(y: torch.Tensor, ids: torch.Tensor, index: torch.Tensor, values: torch.Tensor,
                     count: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.replace_rows`` (which checks the arguments; semantics there)."""
    if meta.no_delta:
        return
    counts = count.tolist()
    for k, s in enumerate(meta.active_slots_host):
        c = counts[s]
        if not c:
            continue
        toks = _slot_tokens(meta, k)  # [n]
        hit = ids.index_select(0, toks).unsqueeze(1) == index[s, :c].unsqueeze(0)  # [n, c]
        rows, pos = hit.nonzero(as_tuple=True)  # ids are distinct per slot: one match at most per token
        if rows.numel():
            y.index_copy_(0, toks.index_select(0, rows), values[s].index_select(0, pos).to(y.dtype))


@on_op_threads
def cpu_head_rows(logits: torch.Tensor, h: torch.Tensor, index: torch.Tensor, values: torch.Tensor,
                  count: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.head_rows`` (which checks the arguments; semantics there)."""
    if meta.no_delta:
        return
    counts = count.tolist()
    for k, s in enumerate(meta.active_slots_host):
        c = counts[s]
        if not c:
            continue
        toks = _slot_tokens(meta, k)  # [n]
        dots = f32(h.index_select(0, toks)) @ f32(values[s, :c]).t()  # [n, c] fp32
        logits[toks.unsqueeze(1), index[s, :c].unsqueeze(0)] = dots.to(logits.dtype)
