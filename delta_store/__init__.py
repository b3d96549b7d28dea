"""Durable delta storage: canonical Delta, importers, validation, catalogue, blobs, host cache.

Knows nothing of accelerators: everything here is CPU tensors, files and SQLite.
"""
from .base_spec import BaseSpec, ModuleInfo, layer_index
from .delta import ACTIVATIONS, ADAPTER_SOURCES, KINDS, AdapterTerm, Delta, LoraTerm, ModuleDelta
from .errors import (BaseMismatch, DeltaError, DeltaServeError, InvalidArgument, NotFound, UnsupportedDelta)
from .native import dump_native, load_native
from .records import DeltaKey, DeltaVersion, TenantQuotas, Tenant
from .settings import StoreSettings
from .store import DeltaStore, StoreStats

__all__ = ["ACTIVATIONS", "ADAPTER_SOURCES", "KINDS", "AdapterTerm", "BaseMismatch", "BaseSpec", "Delta",
           "DeltaError", "DeltaServeError", "InvalidArgument", "LoraTerm", "ModuleDelta", "ModuleInfo",
           "NotFound", "UnsupportedDelta", "layer_index",
           "DeltaKey", "DeltaStore", "DeltaVersion", "TenantQuotas", "StoreSettings", "StoreStats", "Tenant", "dump_native", "load_native"]
