"""API-key authentication and the admin role (DESIGN D10).

Keys travel as ``authorization: Bearer <key>`` call metadata. The store keeps only their sha256
(``store.tenants``); this module parses the header, looks the key up and checks roles. A missing,
malformed or unknown key is UNAUTHENTICATED with the same message shape, so a caller learns
nothing about which tenants exist.
"""
from __future__ import annotations

from collections.abc import Iterable

from delta_store.errors import NotFound, PermissionDenied, Unauthenticated

from .rate_limits import RateLimits

MAX_KEY_CHARS = 256  # generated keys are ~50 characters; anything far longer is garbage


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The API key in ``authorization: Bearer <key>`` metadata, or raise Unauthenticated."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    scheme, _, key = value.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_CHARS:
        raise Unauthenticated("malformed authorization metadata: expected 'Bearer <api key>'")
    return key


class Authenticator:
    """Maps call metadata to a tenant record of ``store.tenants`` (``name``, ``admin``, quota fields)."""

    def __init__(self, tenants):
        self._tenants = tenants

    def authenticate(self, metadata) -> object:
        key = bearer_key(metadata)
        try:
            tenant = self._tenants.get_by_key(key)
        except NotFound:
            tenant = None
        if tenant is None:
            raise Unauthenticated("invalid API key")
        return tenant

    def authenticate_admin(self, metadata) -> object:
        tenant = self.authenticate(metadata)
        if not is_admin(tenant):
            raise PermissionDenied(f"tenant {tenant_name(tenant)!r} is not an admin: the Tenants service needs an admin key")
        return tenant


def tenant_name(tenant) -> str:
    return str(tenant.name)


def is_admin(tenant) -> bool:
    return bool(getattr(tenant, "admin", False) or getattr(tenant, "is_admin", False))


def rate_limits(tenant, config) -> RateLimits:
    """The tenant's rate limits; a field the tenant does not set (None) takes ServerConfig's default."""
    quotas = getattr(tenant, "quotas", tenant)

    def pick(key: str) -> int:
        value = getattr(quotas, key, None)
        return int(getattr(config, f"default_{key}") if value is None else value)

    return RateLimits(pick("requests_per_minute"), pick("tokens_per_minute"), pick("max_concurrent"))
