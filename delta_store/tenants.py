"""Tenants and their API keys (D10). Keys are ``ds_`` + 32 random bytes (url-safe base64, 43 chars),
shown once at creation or rotation and stored only as their sha256: a stolen catalogue yields no
usable key, and 256 random bits make a fast unsalted hash safe (no dictionary to attack)."""
from __future__ import annotations

import dataclasses
import hashlib
import secrets
from typing import Callable

from .catalogue import Catalogue
from .errors import InvalidArgument, NotFound, Unauthenticated
from .names import check_name
from .records import DeltaVersion, TenantQuotas, Tenant

KEY_PREFIX = "ds_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantRegistry:
    """``store.tenants``: create, look up by key, list, delete, rotate keys, set quotas."""

    def __init__(self, catalogue: Catalogue, default_quotas: TenantQuotas,
                 on_delete: Callable[[list[DeltaVersion]], None]):
        self._cat = catalogue
        self._defaults = default_quotas
        self._on_delete = on_delete  # collects blobs and tells subscribers (device slots) what is gone

    def create(self, name: str, *, is_admin: bool = False, quotas: TenantQuotas | None = None) -> tuple[Tenant, str]:
        """A new tenant and its API key (the only time the key is available in clear)."""
        check_name(name, "tenant name")
        key = new_api_key()
        return self._cat.create_tenant(name, hash_key(key), bool(is_admin), quotas or self._defaults), key

    def get_by_key(self, key: str) -> Tenant | None:
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
            return None
        return self._cat.tenant(key_sha256=hash_key(key))

    def authenticate(self, key: str) -> Tenant:
        tenant = self.get_by_key(key)
        if tenant is None:
            raise Unauthenticated("unknown or revoked API key")
        return tenant

    def get(self, tenant_id: str) -> Tenant:
        tenant = self._cat.tenant(id=tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        return tenant

    def get_by_name(self, name: str) -> Tenant:
        tenant = self._cat.tenant(name=name)
        if tenant is None:
            raise NotFound(f"tenant {name!r} not found")
        return tenant

    def list(self) -> list[Tenant]:
        return self._cat.list_tenants()

    def delete(self, tenant_id: str) -> None:
        """Delete the tenant, its deltas and (when unreferenced) their blobs."""
        self._on_delete(self._cat.delete_tenant(tenant_id))

    def rotate_key(self, tenant_id: str) -> str:
        """Replace the tenant's key; the old one stops working at once. Returns the new key."""
        key = new_api_key()
        self._cat.update_tenant(tenant_id, key_sha256=hash_key(key))
        return key

    def set_quotas(self, tenant_id: str, quotas: TenantQuotas | None = None, **fields) -> Tenant:
        """Replace the quotas, or change some fields: ``set_quotas(tid, max_deltas=10)``."""
        if quotas is None:
            unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(TenantQuotas)})
            if unknown:
                raise InvalidArgument(f"unknown quota field(s): {', '.join(unknown)}")
            quotas = dataclasses.replace(self.get(tenant_id).quotas, **fields)
        return self._cat.update_tenant(tenant_id, **{f.name: getattr(quotas, f.name)
                                                     for f in dataclasses.fields(TenantQuotas)})
