"""The catalogue: tenants, delta names and immutable versions, in SQLite or PostgreSQL (D7, D12).

SQLAlchemy Core statements over the tables of ``catalogue_schema``, one text for both dialects;
``database`` owns the engines, the transactions and the migrations. Every write is one transaction
that holds the catalogue's write lock from its first statement (SQLite ``BEGIN IMMEDIATE``, a
PostgreSQL advisory lock), so the checks inside it (quotas, "is this blob still referenced") cannot
race with another writer, in this process or in another replica. Versions are immutable: only their
usage counters change after the insert.

Version numbers are never reused for a name (``name@N`` always means one digest, or NOT_FOUND): the
``version_marks`` table keeps, per tenant and name, the highest version ever given, and it outlives the
``deltas`` row that a delete of the last version removes (revision 0002; a catalogue migrated to it takes
its marks from ``deltas.next_version``). Each version also records ``num_parameters`` (NULL in rows
written before 0002: the store fills them from the blobs at start-up). Quotas are checked twice: by
:meth:`Catalogue.check_quota` before an upload's payload is read (a snapshot, so a refusal costs the
tenant nothing), and again inside ``add_version``'s write transaction, which is what holds across
replicas.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from . import database
from .catalogue_schema import blob_gc, deltas, tenants, version_marks, versions
from .errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from .records import DeltaVersion, Tenant, TenantQuotas

_VERSION_COLUMNS = (deltas.c.tenant_id, deltas.c.name, *[c for c in versions.c if c.name != "delta_id"])
_TENANT_COLUMNS = frozenset(c.name for c in tenants.c) - {"id", "created"}


def _versions_select() -> sa.Select:
    return sa.select(*_VERSION_COLUMNS).select_from(versions.join(deltas, deltas.c.id == versions.c.delta_id))


def _version(row) -> DeltaVersion:
    return DeltaVersion.from_row(row._mapping)


def _tenant(row) -> Tenant:
    m = row._mapping
    q = TenantQuotas(m["max_deltas"], m["max_bytes"], m["requests_per_minute"], m["tokens_per_minute"], m["max_concurrent"])
    return Tenant(m["id"], m["name"], bool(m["is_admin"]), q, m["created"])


class Catalogue:
    def __init__(self, target: str | os.PathLike | sa.URL, *, busy_timeout_s: float = 30.0):
        """``target``: a SQLite file path, or a database URL (``sqlite:///...``, ``postgresql://...``)."""
        self.url = database.catalogue_url(target)
        self.where = database.describe(self.url)
        self.busy_timeout_s = busy_timeout_s
        self.engine = database.create_engine(self.url, busy_timeout_s=busy_timeout_s)
        try:
            self.revision = database.migrate(self.engine, self.where)
        except BaseException:
            self.engine.dispose()
            raise
        self._insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def write(self):
        """One write transaction holding the write lock (``with catalogue.write() as conn``)."""
        return database.write(self.engine, self.where)

    def read(self):
        """A read snapshot spanning several statements."""
        return database.read(self.engine, self.where)

    def close(self) -> None:
        self.engine.dispose()

    # -- tenants ------------------------------------------------------------------------------------
    def create_tenant(self, name: str, key_sha256: str, is_admin: bool, quotas: TenantQuotas) -> Tenant:
        tid = "t_" + uuid.uuid4().hex[:16]
        now = time.time()
        with self.write() as c:
            if c.execute(sa.select(tenants.c.id).where(tenants.c.name == name)).first():
                raise AlreadyExists(f"tenant {name!r} already exists")
            c.execute(tenants.insert().values(
                id=tid, name=name, key_sha256=key_sha256, is_admin=int(is_admin), max_deltas=quotas.max_deltas,
                max_bytes=quotas.max_bytes, requests_per_minute=quotas.requests_per_minute,
                tokens_per_minute=quotas.tokens_per_minute, max_concurrent=quotas.max_concurrent, created=now))
        return Tenant(tid, name, is_admin, quotas, now)

    def tenant(self, *, id: str | None = None, name: str | None = None, key_sha256: str | None = None) -> Tenant | None:
        col, value = next((c, v) for c, v in (("id", id), ("name", name), ("key_sha256", key_sha256)) if v is not None)
        with self.read() as c:
            row = c.execute(sa.select(tenants).where(tenants.c[col] == value)).first()
        return None if row is None else _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        with self.read() as c:
            return [_tenant(r) for r in c.execute(sa.select(tenants).order_by(tenants.c.name))]

    def update_tenant(self, tenant_id: str, **columns) -> Tenant:
        unknown = sorted(set(columns) - _TENANT_COLUMNS)
        if unknown:
            raise InvalidArgument(f"unknown tenant column(s): {', '.join(unknown)}")
        with self.write() as c:
            if c.execute(tenants.update().where(tenants.c.id == tenant_id).values(**columns)).rowcount == 0:
                raise NotFound(f"tenant {tenant_id!r} not found")
            return _tenant(c.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).one())

    def delete_tenant(self, tenant_id: str) -> list[DeltaVersion]:
        """Delete a tenant and all its deltas (blobs queued for collection); returns the versions gone."""
        with self.write() as c:
            gone = [_version(r) for r in c.execute(_versions_select().where(deltas.c.tenant_id == tenant_id))]
            if c.execute(tenants.delete().where(tenants.c.id == tenant_id)).rowcount == 0:
                raise NotFound(f"tenant {tenant_id!r} not found")
            self._queue_gc(c, [v.digest for v in gone])
        return gone

    # -- versions -----------------------------------------------------------------------------------
    def add_version(self, tenant_id: str, name: str, digest: str, size: int, kinds: list[str], max_rank: int,
                    max_width: int, source_format: str, description: str, labels: dict[str, str],
                    ensure_blob: Callable[[], None], num_parameters: int = 0) -> DeltaVersion:
        """Commit a new version row. ``ensure_blob`` runs inside the write lock and must leave the blob
        durable (it re-writes it if a concurrent collection removed it); quotas are checked here too."""
        now = time.time()
        with self.write() as c:
            row = self._check_quotas(c, tenant_id, name, size)
            ensure_blob()
            version = self._next_version(c, tenant_id, name, row)
            if row is None:
                delta_id = c.execute(deltas.insert().values(tenant_id=tenant_id, name=name, next_version=version + 1,
                                                            created=now)).inserted_primary_key[0]
            else:
                delta_id = row.id
                c.execute(deltas.update().where(deltas.c.id == delta_id).values(next_version=version + 1))
            c.execute(versions.insert().values(
                delta_id=delta_id, version=version, digest=digest, size=size, kinds=json.dumps(sorted(kinds)),
                max_rank=max_rank, max_width=max_width, source_format=source_format, description=description,
                labels=json.dumps(labels, sort_keys=True), created=now, num_parameters=num_parameters))
            c.execute(blob_gc.delete().where(blob_gc.c.digest == digest))
        return DeltaVersion(tenant_id, name, version, digest, size, tuple(sorted(kinds)), max_rank, max_width,
                            source_format, description, dict(labels), now, num_parameters=num_parameters)

    def check_quota(self, tenant_id: str, name: str, size: int = 0) -> None:
        """ResourceExhausted if a new version of ``name`` of ``size`` bytes would break the tenant's quotas
        now (before an upload is read: ``add_version`` checks again, under the write lock, before it commits)."""
        with self.read() as c:
            self._check_quotas(c, tenant_id, name, size)

    def _check_quotas(self, c: sa.Connection, tenant_id: str, name: str, size: int):
        """The quotas for a new version of ``name``; returns the name's ``deltas`` row (None: a new name)."""
        t = c.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).first()
        if t is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        t = t._mapping
        row = c.execute(sa.select(deltas.c.id, deltas.c.next_version)
                        .where(deltas.c.tenant_id == tenant_id, deltas.c.name == name)).first()
        if row is None:
            count = c.execute(sa.select(sa.func.count()).select_from(deltas)
                              .where(deltas.c.tenant_id == tenant_id)).scalar_one()
            if count + 1 > t["max_deltas"]:
                raise ResourceExhausted(f"tenant {t['name']!r}: delta quota reached ({count} of "
                                        f"{t['max_deltas']}); delete one first")
        used = self._bytes_used(c, tenant_id)
        if used + max(size, 1) > t["max_bytes"]:  # size 0: before the upload is read, any version needs a byte
            raise ResourceExhausted(f"tenant {t['name']!r}: storage quota exceeded ({used} + {size} bytes > "
                                    f"{t['max_bytes']})" if size else
                                    f"tenant {t['name']!r}: storage quota full ({used} of {t['max_bytes']} bytes)")
        return row

    # -- version numbers: never reused (the high-water mark outlives every version of the name) --------
    def _next_version(self, c: sa.Connection, tenant_id: str, name: str, row) -> int:
        mark = c.execute(sa.select(version_marks.c.last_version)
                         .where(version_marks.c.tenant_id == tenant_id, version_marks.c.name == name)).scalar()
        version = max(row.next_version if row is not None else 1, (mark or 0) + 1)
        stmt = self._insert(version_marks).values(tenant_id=tenant_id, name=name, last_version=version)
        c.execute(stmt.on_conflict_do_update(index_elements=["tenant_id", "name"],
                                             set_={"last_version": stmt.excluded.last_version}))
        return version

    @staticmethod
    def _bytes_used(c: sa.Connection, tenant_id: str) -> int:
        q = (sa.select(sa.func.coalesce(sa.func.sum(versions.c.size), 0))
             .select_from(versions.join(deltas, deltas.c.id == versions.c.delta_id)).where(deltas.c.tenant_id == tenant_id))
        return int(c.execute(q).scalar_one())  # PostgreSQL's SUM(bigint) is numeric

    def resolve(self, tenant_id: str, name: str, version: int | None) -> DeltaVersion | None:
        q = _versions_select().where(deltas.c.tenant_id == tenant_id, deltas.c.name == name)
        q = q.order_by(versions.c.version.desc()).limit(1) if version is None else q.where(versions.c.version == version)
        with self.read() as c:
            row = c.execute(q).first()
        return None if row is None else _version(row)

    def versions(self, tenant_id: str, name: str) -> list[DeltaVersion]:
        q = _versions_select().where(deltas.c.tenant_id == tenant_id, deltas.c.name == name).order_by(versions.c.version)
        with self.read() as c:
            return [_version(r) for r in c.execute(q)]

    def list_latest(self, tenant_id: str, after: str, limit: int) -> list[DeltaVersion]:
        """The latest version of each delta of a tenant, by name, starting after ``after``."""
        inner = versions.alias("latest")
        latest = sa.select(sa.func.max(inner.c.version)).where(inner.c.delta_id == deltas.c.id).scalar_subquery()
        q = (_versions_select().where(deltas.c.tenant_id == tenant_id, deltas.c.name > after,
                                      versions.c.version == latest)
             .order_by(deltas.c.name).limit(limit))
        with self.read() as c:
            return [_version(r) for r in c.execute(q)]

    def usage(self, tenant_id: str) -> tuple[int, int]:
        """(number of deltas, bytes stored) for a tenant, from one snapshot."""
        with self.read() as c:
            n = c.execute(sa.select(sa.func.count()).select_from(deltas)
                          .where(deltas.c.tenant_id == tenant_id)).scalar_one()
            return n, self._bytes_used(c, tenant_id)

    def delete(self, tenant_id: str, name: str, version: int | None) -> list[DeltaVersion]:
        """Delete one version, or every version of ``name``; returns what was deleted."""
        with self.write() as c:
            q = _versions_select().where(deltas.c.tenant_id == tenant_id, deltas.c.name == name)
            if version is not None:
                q = q.where(versions.c.version == version)
            gone = [_version(r) for r in c.execute(q)]
            if not gone:
                return []
            delta_id = c.execute(sa.select(deltas.c.id).where(deltas.c.tenant_id == tenant_id,
                                                              deltas.c.name == name)).scalar_one()
            if version is None:
                c.execute(deltas.delete().where(deltas.c.id == delta_id))
            else:
                c.execute(versions.delete().where(versions.c.delta_id == delta_id, versions.c.version == version))
                if c.execute(sa.select(versions.c.version).where(versions.c.delta_id == delta_id).limit(1)).first() is None:
                    c.execute(deltas.delete().where(deltas.c.id == delta_id))
            self._queue_gc(c, [v.digest for v in gone])
        return gone

    def exists(self, tenant_id: str, name: str, version: int, digest: str) -> bool:
        q = (_versions_select().where(deltas.c.tenant_id == tenant_id, deltas.c.name == name,
                                      versions.c.version == version, versions.c.digest == digest).limit(1))
        with self.read() as c:
            return c.execute(q).first() is not None

    def add_usage(self, usage: dict[tuple[str, str, int, str], tuple[int, int, float]]) -> None:
        """Add request/token counters and bump last-used, for many versions in one transaction."""
        delta_id = (sa.select(deltas.c.id).where(deltas.c.tenant_id == sa.bindparam("t"),
                                                 deltas.c.name == sa.bindparam("n")).scalar_subquery())
        last = sa.bindparam("last", type_=sa.Double)
        stmt = (versions.update()
                .where(versions.c.version == sa.bindparam("v"), versions.c.digest == sa.bindparam("d"),
                       versions.c.delta_id == delta_id)
                .values(requests=versions.c.requests + sa.bindparam("r"), tokens=versions.c.tokens + sa.bindparam("k"),
                        last_used=sa.case((sa.func.coalesce(versions.c.last_used, 0) > last, versions.c.last_used),
                                          else_=last)))
        rows = [dict(t=t, n=n, v=v, d=d, r=r, k=k, last=last_used)
                for (t, n, v, d), (r, k, last_used) in usage.items()]
        if rows:
            with self.write() as c:
                c.execute(stmt, rows)

    def digests_without_parameter_count(self) -> list[str]:
        """Digests of versions written before revision 0002 (no ``num_parameters`` yet)."""
        with self.read() as c:
            return list(c.execute(sa.select(versions.c.digest).where(versions.c.num_parameters.is_(None))
                                  .distinct()).scalars())

    def set_parameter_count(self, digest: str, num_parameters: int) -> None:
        with self.write() as c:
            c.execute(versions.update().where(versions.c.digest == digest, versions.c.num_parameters.is_(None))
                      .values(num_parameters=num_parameters))

    # -- blob collection ------------------------------------------------------------------------------
    def _queue_gc(self, c: sa.Connection, digests: list[str]) -> None:
        if digests:
            now = time.time()
            c.execute(self._insert(blob_gc).on_conflict_do_nothing(index_elements=["digest"]),
                      [dict(digest=d, since=now) for d in sorted(set(digests))])

    def referenced_digests(self) -> set[str]:
        with self.read() as c:
            return set(c.execute(sa.select(versions.c.digest).distinct()).scalars())

    def gc_queue(self) -> list[str]:
        with self.read() as c:
            return list(c.execute(sa.select(blob_gc.c.digest)).scalars())

    def collect(self, digest: str, delete_blob: Callable[[str], None]) -> bool:
        """Delete the blob if no version references it, under the write lock (so no put can race in
        between the check and the delete); True if deleted. A crash after the blob's deletion and before
        the commit leaves a queue entry for a missing blob, which the next collection just drops."""
        with self.write() as c:
            if c.execute(sa.select(versions.c.digest).where(versions.c.digest == digest).limit(1)).first():
                c.execute(blob_gc.delete().where(blob_gc.c.digest == digest))
                return False
            delete_blob(digest)
            c.execute(blob_gc.delete().where(blob_gc.c.digest == digest))
            return True
