"""Trainable tokens on the CPU backend: replacement embedding rows and the head logits of those ids.

Per active slot with ``count[s] > 0`` (trainable-token deltas are few and their rows a handful), its
tokens (its segment of the slot-sorted tokens) are matched against its ``count`` ids, read as views of the
slot's runs (``kernels.TokenPages``); tokens of other slots are never touched.
"""
from __future__ import annotations

import torch

from ..meta import DeltaKernelMeta
from ..pages import TokenPages
from .tensors import f32
from .threads import on_op_threads


def _slot_tokens(meta: DeltaKernelMeta, k: int) -> torch.Tensor:
    """int64 token ids of the k-th active slot (its segment of the slot-sorted tokens)."""
    a, b = meta.seg_start_host[k], meta.seg_start_host[k + 1]
    return meta.sorted_active_ids[a:b]


def _runs(pages: TokenPages, meta: DeltaKernelMeta):
    """(k, slot, ids [c], values [c, h]) of every active slot with trainable tokens here."""
    if meta.no_delta or pages.max_count == 0:
        return
    counts, starts, id_starts = pages.count.tolist(), pages.start.tolist(), pages.id_start.tolist()
    for k, s in enumerate(meta.active_slots_host):
        c = counts[s]
        if c:
            yield k, pages.ids[id_starts[s]:id_starts[s] + c], pages.values[starts[s]:starts[s] + c]


@on_op_threads
def cpu_replace_rows(y: torch.Tensor, ids: torch.Tensor, pages: TokenPages, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.replace_rows`` (which checks the arguments; semantics there)."""
    for k, index, values in _runs(pages, meta):
        toks = _slot_tokens(meta, k)  # [n]
        hit = ids.index_select(0, toks).unsqueeze(1) == index.unsqueeze(0)  # [n, c]
        rows, pos = hit.nonzero(as_tuple=True)  # ids are distinct per slot: one match at most per token
        if rows.numel():
            y.index_copy_(0, toks.index_select(0, rows), values.index_select(0, pos).to(y.dtype))


@on_op_threads
def cpu_head_rows(logits: torch.Tensor, h: torch.Tensor, pages: TokenPages, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.head_rows`` (which checks the arguments; semantics there)."""
    for k, index, values in _runs(pages, meta):
        toks = _slot_tokens(meta, k)  # [n]
        dots = f32(h.index_select(0, toks)) @ f32(values).t()  # [n, c] fp32
        logits[toks.unsqueeze(1), index.unsqueeze(0)] = dots.to(logits.dtype)
