"""The delta-aware model and device residency: what turns one HF model into a server of many deltas.

    model.py    wrap_model(model, ...) -> DeltaModel: target modules replaced in place (D1), one shared DeltaBatch
    linear.py   DeltaLinear: nn.Linear / GPT-2 Conv1D + slot pools (LoRA, bias, (IA)3, bottleneck adapters; D2)
    norm.py     DeltaNorm: residual taps at the pre-norms, LayerNorm BitFit
    adapter.py  AdapterPool + ResidualTap: bottleneck adapters at residual sites
    batch.py    DeltaBatch: the per-step token -> slot ids every wrapper reads
    slots.py    SlotManager: which delta version sits in which device slot (LRU, pins, async loads)
"""
from .adapter import AdapterPool, ResidualTap
from .batch import DeltaBatch
from .linear import DeltaLinear
from .model import DeltaModel, wrap_model
from .norm import DeltaNorm
from .slots import SlotManager

__all__ = ["AdapterPool", "DeltaBatch", "DeltaLinear", "DeltaModel", "DeltaNorm", "ResidualTap", "SlotManager",
           "wrap_model"]
