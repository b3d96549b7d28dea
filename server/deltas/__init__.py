"""The delta-aware model and device residency: what turns one HF model into a server of many deltas.

    model.py        wrap_model(model, ...) -> DeltaModel: target modules replaced in place (D1), one shared DeltaBatch
    linear.py       DeltaLinear: nn.Linear / GPT-2 Conv1D + paged delta terms (LoRA, bias, (IA)3, adapters, DoRA)
    norm.py         DeltaNorm: residual taps at the pre-norms, LayerNorm BitFit
    adapter.py      bottleneck adapters of a DeltaLinear (rows, pages, apply) + ResidualTap
    dora.py         DoRA's column scale (g, shift) of a DeltaLinear, computed at staging from the base weight
    token_rows.py   DeltaEmbedding + DeltaHead: trainable tokens' replacement rows (input embedding, output head)
    batch.py        DeltaBatch: the per-step token -> slot ids every wrapper reads
    pages.py        RowArena: a layer's rows cut into rank-bucket regions of equal cells (D13)
    terms.py        TermRows: a layer's arenas, per-slot table and term -> cell bookkeeping
    slot_fields.py  SlotFields: the per-slot table (ranks, scales, first rows) the kernels index by slot
    residency.py    Residency: the one owner of device residency (budget, LRU, pins, prefetch, loads)
"""
from .adapter import ResidualTap
from .batch import DeltaBatch
from .linear import DeltaLinear
from .model import DeltaModel, StagedDelta, wrap_model
from .norm import DeltaNorm
from .pages import RowArena
from .token_rows import DeltaEmbedding, DeltaHead

__all__ = ["DeltaBatch", "DeltaEmbedding", "DeltaHead", "DeltaLinear", "DeltaModel", "DeltaNorm", "ResidualTap",
           "RowArena", "StagedDelta", "wrap_model"]
