"""StoreSettings: the delta store's own limits and tunables, checked in one place.

Validation limits on the delta itself (rank, width, dtypes) are ``delta_store.validate.Limits``;
these are about files, archives, memory and housekeeping. ``from_config`` takes them from the
``ServerConfig`` so defaults live there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidArgument
from .records import Quotas


@dataclass(frozen=True, slots=True)
class StoreSettings:
    host_cache_bytes: int = 2 << 30  # host-memory tier budget (LRU by bytes)
    max_upload_bytes: int = 512 << 20  # one payload file (or folder) as uploaded
    max_archive_members: int = 1000  # a PEFT folder has 2-3 files; 1000 leaves room for odd packers
    max_archive_bytes: int = 2 << 30  # extracted total: fp32 checkpoints inflate little, bombs a lot
    max_description: int = 4096  # characters
    max_labels: int = 64  # label pairs per version; keys 1-128 chars, values up to 1024
    orphan_grace_s: float = 3600.0  # blobs no row references are kept this long (a writer may be mid-put)
    temp_grace_s: float = 3600.0  # temp files of a writer whose process is still alive are kept this long
    busy_timeout_s: float = 30.0  # SQLite: how long a writer waits for the lock before failing
    default_quotas: Quotas = field(default_factory=Quotas)

    def __post_init__(self) -> None:
        for name in ("host_cache_bytes", "max_upload_bytes", "max_archive_members", "max_archive_bytes",
                     "max_description", "max_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"store setting {name} must be a non-negative integer, got {value!r}")
        for name in ("orphan_grace_s", "temp_grace_s", "busy_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (value >= 0):
                raise InvalidArgument(f"store setting {name} must be a non-negative number, got {value!r}")
        if not isinstance(self.default_quotas, Quotas):
            raise InvalidArgument(f"store setting default_quotas must be Quotas, got {type(self.default_quotas)}")

    @classmethod
    def from_config(cls, config, **overrides) -> "StoreSettings":
        """From a ``ServerConfig``: host tier budget, upload limit and default tenant quotas."""
        values = dict(host_cache_bytes=config.host_cache_bytes, max_upload_bytes=config.max_upload_bytes,
                      default_quotas=Quotas.from_config(config))
        values.update(overrides)
        return cls(**values)
