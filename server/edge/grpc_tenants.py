"""The Tenants servicer (admin keys only): create, list, delete, rotate key, set quotas.

Thin: pb <-> ``delta_store.records.Tenant``/``TenantQuotas``; the store's ``tenants`` registry does the
work (keys stored as sha256 only, the clear key returned once).
"""
from __future__ import annotations

import asyncio
import dataclasses

from delta_store.errors import FailedPrecondition
from delta_store.records import TenantQuotas

from ..logs import get_logger
from ..pb import common_pb2, tenants_pb2, tenants_pb2_grpc

log = get_logger("tenants")

# pb Quotas field -> delta_store.records.TenantQuotas field
QUOTA_FIELDS = {"max_deltas": "max_deltas", "max_delta_bytes": "max_bytes", "requests_per_minute": "requests_per_minute",
                "tokens_per_minute": "tokens_per_minute", "max_concurrent": "max_concurrent"}


def quotas_to_pb(q: TenantQuotas) -> common_pb2.Quotas:
    return common_pb2.Quotas(**{pb: getattr(q, mine) for pb, mine in QUOTA_FIELDS.items()})


def quota_changes(msg: common_pb2.Quotas) -> dict[str, int]:
    """Only the fields the caller set (proto3 ``optional``)."""
    return {mine: int(getattr(msg, pb)) for pb, mine in QUOTA_FIELDS.items() if msg.HasField(pb)}


def tenant_to_pb(t) -> tenants_pb2.Tenant:
    return tenants_pb2.Tenant(name=t.name, admin=t.is_admin, quotas=quotas_to_pb(t.quotas),
                              created_unix_ms=int(t.created * 1000))


class TenantsServicer(tenants_pb2_grpc.TenantsServicer):
    def __init__(self, app):
        self.app = app

    async def _admin(self, context):
        return await asyncio.to_thread(self.app.auth.authenticate_admin, context.invocation_metadata())

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def CreateTenant(self, request, context):
        admin = await self._admin(context)
        reg = self.app.store.tenants
        quotas = dataclasses.replace(self.app.store.settings.default_quotas, **quota_changes(request.quotas))
        tenant, key = await self._call(reg.create, request.name, is_admin=request.admin, quotas=quotas)
        log.info("tenant_created", tenant=tenant.name, admin=tenant.is_admin, by=admin.name)
        return tenants_pb2.CreateTenantResponse(tenant=tenant_to_pb(tenant), api_key=key)

    async def ListTenants(self, request, context):
        await self._admin(context)
        tenants = await self._call(self.app.store.tenants.list)
        return tenants_pb2.ListTenantsResponse(tenants=[tenant_to_pb(t) for t in sorted(tenants, key=lambda t: t.name)])

    async def DeleteTenant(self, request, context):
        admin = await self._admin(context)
        reg = self.app.store.tenants
        tenant = await self._call(reg.get_by_name, request.name)
        if tenant.id == admin.id:
            raise FailedPrecondition(f"tenant {tenant.name!r} cannot delete itself: use another admin key")
        await self._call(reg.delete, tenant.id)
        self.app.rate_limiter.forget(tenant.name)
        log.info("tenant_deleted", tenant=tenant.name, by=admin.name)
        return tenants_pb2.DeleteTenantResponse()

    async def RotateKey(self, request, context):
        admin = await self._admin(context)
        reg = self.app.store.tenants
        tenant = await self._call(reg.get_by_name, request.name)
        key = await self._call(reg.rotate_key, tenant.id)
        log.info("key_rotated", tenant=tenant.name, by=admin.name)
        return tenants_pb2.RotateKeyResponse(api_key=key)

    async def SetQuotas(self, request, context):
        admin = await self._admin(context)
        reg = self.app.store.tenants
        tenant = await self._call(reg.get_by_name, request.name)
        updated = await self._call(reg.set_quotas, tenant.id, **quota_changes(request.quotas))
        log.info("quotas_set", tenant=tenant.name, by=admin.name)
        return tenants_pb2.SetQuotasResponse(tenant=tenant_to_pb(updated))
