"""The delta-aware model surface named in docs/INTERFACES.md: one import for the model runner and the slot manager.

Each noun lives in its own file: ``delta_batch.DeltaBatch`` (per-step slot ids, D1),
``delta_linear.DeltaLinear`` (Linear/Conv1D + slot pools, D2), ``delta_norm.DeltaNorm`` (residual taps and
LayerNorm BitFit), ``delta_adapter.AdapterPool`` (bottleneck adapters at residual sites) and
``delta_model.wrap_model``/``DeltaModel``.
"""
from .delta_adapter import AdapterPool, ResidualTap
from .delta_batch import DeltaBatch
from .delta_linear import DeltaLinear
from .delta_model import DeltaModel, wrap_model
from .delta_norm import DeltaNorm

__all__ = ["AdapterPool", "DeltaBatch", "DeltaLinear", "DeltaModel", "DeltaNorm", "ResidualTap", "wrap_model"]
