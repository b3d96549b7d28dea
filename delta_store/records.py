"""Plain records the catalogue returns: tenants, their quotas, immutable delta versions and the key that
names one version everywhere (engine, slots, host tier)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class TenantQuotas:
    """A tenant's stored limits. 0 for a rate or count means "nothing allowed", not "unlimited".

    No defaults here: the server's defaults are ``ServerConfig.default_*`` and ``server/app.py``
    builds the default quotas from them (``store_config``)."""

    max_deltas: int  # distinct delta names
    max_bytes: int  # sum of stored version sizes
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent: int

    def __post_init__(self) -> None:
        for name in ("max_deltas", "max_bytes", "requests_per_minute", "tokens_per_minute", "max_concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value < 1 << 62):
                raise InvalidArgument(f"quota {name} must be an integer in [0, 2^62), got {value!r}")


@dataclass(frozen=True, slots=True)
class DeltaKey:
    """Identifies one immutable delta version. The digest makes a replaced version a new key,
    so a stale device slot can never serve it (vLLM's same-name reload bug)."""

    tenant: str  # tenant id
    name: str
    version: int
    digest: str  # sha256 of the native bytes


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    is_admin: bool
    quotas: TenantQuotas
    created: float


@dataclass(frozen=True, slots=True)
class DeltaVersion:
    """One immutable version of a tenant's delta. ``name@version`` pins it; ``digest`` addresses its blob."""

    tenant: str  # tenant id
    name: str
    version: int
    digest: str  # sha256 of the native bytes
    size: int  # bytes of the native blob
    kinds: tuple[str, ...]
    max_rank: int
    max_width: int
    source_format: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    last_used: float | None = None
    requests: int = 0
    tokens: int = 0
    num_parameters: int = 0  # scalars in the delta's tensors

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def key(self) -> DeltaKey:
        """The :class:`DeltaKey` of this version (digest included), as the engine and the slots use it."""
        return DeltaKey(self.tenant, self.name, self.version, self.digest)

    @classmethod
    def from_row(cls, row) -> "DeltaVersion":
        return cls(tenant=row["tenant_id"], name=row["name"], version=row["version"], digest=row["digest"],
                   size=row["size"], kinds=tuple(json.loads(row["kinds"])), max_rank=row["max_rank"],
                   max_width=row["max_width"], source_format=row["source_format"], description=row["description"],
                   labels=json.loads(row["labels"]), created=row["created"], last_used=row["last_used"],
                   requests=row["requests"], tokens=row["tokens"], num_parameters=row["num_parameters"] or 0)
