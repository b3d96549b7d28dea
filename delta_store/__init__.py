"""Durable delta storage: canonical Delta, the import path, validation, catalogue, blobs, host cache.

Knows nothing of accelerators or of ``server/``: everything here is CPU tensors, files, SQL (SQLite or PostgreSQL)
and S3 objects, and what the server decides (limits, settings, default quotas, pinned memory) arrives as parameters.
"""
from .base_spec import BaseSpec, ModuleInfo, layer_index
from .delta import ACTIVATIONS, ADAPTER_SOURCES, KINDS, AdapterTerm, Delta, LoraTerm, ModuleDelta
from .errors import (BaseMismatch, DeltaError, DeltaServeError, InvalidArgument, NotFound, UnsupportedDelta)
from .native import dump_native, load_native
from .records import DeltaKey, DeltaVersion, Tenant, TenantQuotas
from .settings import StoreSettings
from .store import DeltaStore, StoreStats

__all__ = ["ACTIVATIONS", "ADAPTER_SOURCES", "KINDS", "AdapterTerm", "BaseMismatch", "BaseSpec", "Delta",
           "DeltaError", "DeltaServeError", "InvalidArgument", "LoraTerm", "ModuleDelta", "ModuleInfo",
           "NotFound", "UnsupportedDelta", "layer_index",
           "DeltaKey", "DeltaStore", "DeltaVersion", "StoreSettings", "StoreStats", "Tenant", "TenantQuotas",
           "dump_native", "load_native"]
