"""StoreSettings: the delta store's own limits and tunables, checked in one place.

Validation limits on the delta itself (rank, width, dtypes) are ``delta_store.validate.Limits``;
these are about files, archives, memory and housekeeping. The first six fields have no default:
the server decides them (``server/app.py`` ``store_config`` builds them from ``ServerConfig``, where
the serving defaults live, and from the device: pinned host memory only helps copies to CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument
from .records import TenantQuotas


@dataclass(frozen=True, slots=True)
class StoreSettings:
    host_cache_bytes: int  # host-memory tier budget (LRU by bytes)
    max_upload_bytes: int  # one payload file (or folder) as uploaded
    default_quotas: TenantQuotas  # of a tenant created without its own
    pin_host_memory: bool  # host-tier tensors in page-locked memory, so host-to-device copies run async
    max_archive_bytes: int  # an archive's extracted total, whatever its size
    max_archive_ratio: float  # an archive's extracted total per byte of the archive (with a 1 MiB floor)
    max_archive_members: int = 1000  # a PEFT folder has 2-3 files; 1000 leaves room for odd packers
    max_description: int = 4096  # characters
    max_labels: int = 64  # label pairs per version; keys 1-128 chars, values up to 1024
    orphan_grace_s: float = 3600.0  # unreferenced blobs of no dead writer are kept this long (a live one may commit)
    # S3 multipart uploads are aborted after this long: a writer on another replica cannot be asked whether it
    # lives (local scratch files need no grace: their owner's flock says it, delta_store/scratch.py)
    temp_grace_s: float = 3600.0
    busy_timeout_s: float = 30.0  # how long a catalogue writer waits for the write lock before failing

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
        if isinstance(self.max_archive_ratio, bool) or not isinstance(self.max_archive_ratio, (int, float)) or \
                not self.max_archive_ratio >= 1:
            raise InvalidArgument(f"store setting max_archive_ratio must be a number >= 1, got {self.max_archive_ratio!r}")
        if not isinstance(self.default_quotas, TenantQuotas):
            raise InvalidArgument(f"store setting default_quotas must be TenantQuotas, got {type(self.default_quotas)}")
        if not isinstance(self.pin_host_memory, bool):
            raise InvalidArgument(f"store setting pin_host_memory must be a bool, got {self.pin_host_memory!r}")
