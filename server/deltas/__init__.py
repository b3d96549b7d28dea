"""The delta-aware model and device residency: what turns one HF model into a server of many deltas.

    model.py    wrap_model(model, ...) -> DeltaModel: target modules replaced in place (D1), one shared DeltaBatch
    linear.py   DeltaLinear: nn.Linear / GPT-2 Conv1D + slot pools (LoRA, bias, (IA)3, bottleneck adapters, DoRA; D2)
    norm.py     DeltaNorm: residual taps at the pre-norms, LayerNorm BitFit
    adapter.py  AdapterPool + ResidualTap: bottleneck adapters at residual sites
    dora.py     DoraPool: DoRA's per-slot column scale, computed at load from the base weight
    token_rows.py  DeltaEmbedding + DeltaHead: trainable tokens' replacement rows (input embedding, output head)
    batch.py    DeltaBatch: the per-step token -> slot ids every wrapper reads
    slots.py    SlotManager: which delta version sits in which device slot (LRU, pins, async loads)
"""
from .adapter import AdapterPool, ResidualTap
from .batch import DeltaBatch
from .linear import DeltaLinear
from .model import DeltaModel, wrap_model
from .norm import DeltaNorm
from .slots import SlotManager
from .token_rows import DeltaEmbedding, DeltaHead

__all__ = ["AdapterPool", "DeltaBatch", "DeltaEmbedding", "DeltaHead", "DeltaLinear", "DeltaModel", "DeltaNorm",
           "ResidualTap", "SlotManager", "wrap_model"]
