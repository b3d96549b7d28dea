"""The catalogue: tenants, delta names and immutable versions in SQLite (WAL mode).

SQLite is an embedded, real database (D7): WAL lets readers run beside one writer, across
threads and processes on one host; ``busy_timeout`` makes writers queue instead of failing.
Each thread gets its own connection (sqlite3 connections must not be shared mid-transaction);
every write is one ``BEGIN IMMEDIATE`` transaction, so checks inside it (quotas, "is this blob
still referenced") cannot race with another writer. ``synchronous=FULL``: an upload that returned
survives a power cut, and uploads are rare enough that the extra fsync (~ms) does not matter.
A deployment past one machine swaps this class for PostgreSQL behind the same methods (D12).

Version numbers are never reused for a name (``name@N`` always means one digest, or NOT_FOUND): the
``version_marks`` table keeps, per tenant and name, the highest version ever given, and it outlives the
``deltas`` row that a delete of the last version removes (schema 2; a schema-1 catalogue is upgraded at
open, its marks taken from ``deltas.next_version``). Each version also records ``num_parameters``
(NULL in rows a schema-1 server wrote: the store fills them from the blobs at start-up).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from .records import DeltaVersion, TenantQuotas, Tenant

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, key_sha256 TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL, max_deltas INTEGER NOT NULL, max_bytes INTEGER NOT NULL,
    requests_per_minute INTEGER NOT NULL, tokens_per_minute INTEGER NOT NULL, max_concurrent INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deltas (
    id INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name TEXT NOT NULL, next_version INTEGER NOT NULL, created REAL NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE IF NOT EXISTS versions (
    delta_id INTEGER NOT NULL REFERENCES deltas(id) ON DELETE CASCADE, version INTEGER NOT NULL,
    digest TEXT NOT NULL, size INTEGER NOT NULL, kinds TEXT NOT NULL, max_rank INTEGER NOT NULL,
    max_width INTEGER NOT NULL, source_format TEXT NOT NULL, description TEXT NOT NULL, labels TEXT NOT NULL,
    created REAL NOT NULL, last_used REAL, requests INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0,
    num_parameters INTEGER, PRIMARY KEY (delta_id, version));
CREATE INDEX IF NOT EXISTS versions_digest ON versions(digest);
CREATE TABLE IF NOT EXISTS blob_gc (digest TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS version_marks (
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE, name TEXT NOT NULL,
    last_version INTEGER NOT NULL, PRIMARY KEY (tenant_id, name));
"""

_VERSION_SELECT = """SELECT d.tenant_id, d.name, v.* FROM versions v JOIN deltas d ON d.id = v.delta_id"""


class Catalogue:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        with self.write() as c:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would COMMIT our BEGIN
                c.execute(statement)
            row = c.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                c.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise FailedPrecondition(f"catalogue {self.path} has schema version {row[0]}; this server knows "
                                         f"up to {SCHEMA_VERSION}")
            elif row[0] == 1:
                self._upgrade_1_to_2(c)

    @staticmethod
    def _upgrade_1_to_2(c: sqlite3.Connection) -> None:
        """Schema 1 -> 2: parameter counts (unknown until the store fills them) and version high-water
        marks, one per live name (names deleted under schema 1 lost theirs with their ``deltas`` row)."""
        c.execute("ALTER TABLE versions ADD COLUMN num_parameters INTEGER")
        c.execute("INSERT OR IGNORE INTO version_marks SELECT tenant_id, name, next_version - 1 FROM deltas")
        c.execute("UPDATE schema_version SET version = 2")

    # -- connections and transactions -------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; takes the database write lock at BEGIN, so checks inside cannot race."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read snapshot spanning several statements (WAL readers never block the writer)."""
        c = self._conn()
        c.execute("BEGIN")
        try:
            yield c
        finally:
            c.execute("COMMIT")

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:
                    pass
            self._conns.clear()
        self._local = threading.local()

    # -- tenants ------------------------------------------------------------------------------------
    @staticmethod
    def _tenant(row) -> Tenant:
        q = TenantQuotas(row["max_deltas"], row["max_bytes"], row["requests_per_minute"], row["tokens_per_minute"],
                   row["max_concurrent"])
        return Tenant(row["id"], row["name"], bool(row["is_admin"]), q, row["created"])

    def create_tenant(self, name: str, key_sha256: str, is_admin: bool, quotas: TenantQuotas) -> Tenant:
        tid = "t_" + uuid.uuid4().hex[:16]
        now = time.time()
        with self.write() as c:
            if c.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"tenant {name!r} already exists")
            c.execute("INSERT INTO tenants VALUES (?,?,?,?,?,?,?,?,?,?)",
                      (tid, name, key_sha256, int(is_admin), quotas.max_deltas, quotas.max_bytes,
                       quotas.requests_per_minute, quotas.tokens_per_minute, quotas.max_concurrent, now))
        return Tenant(tid, name, is_admin, quotas, now)

    def tenant(self, *, id: str | None = None, name: str | None = None, key_sha256: str | None = None) -> Tenant | None:
        col, value = next((c, v) for c, v in (("id", id), ("name", name), ("key_sha256", key_sha256)) if v is not None)
        row = self._conn().execute(f"SELECT * FROM tenants WHERE {col} = ?", (value,)).fetchone()
        return None if row is None else self._tenant(row)

    def list_tenants(self) -> list[Tenant]:
        return [self._tenant(r) for r in self._conn().execute("SELECT * FROM tenants ORDER BY name")]

    def update_tenant(self, tenant_id: str, **columns) -> Tenant:
        sets = ", ".join(f"{k} = ?" for k in columns)
        with self.write() as c:
            cur = c.execute(f"UPDATE tenants SET {sets} WHERE id = ?", (*columns.values(), tenant_id))
            if cur.rowcount == 0:
                raise NotFound(f"tenant {tenant_id!r} not found")
            return self._tenant(c.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).fetchone())

    def delete_tenant(self, tenant_id: str) -> list[DeltaVersion]:
        """Delete a tenant and all its deltas (blobs queued for collection); returns the versions gone."""
        with self.write() as c:
            gone = [DeltaVersion.from_row(r) for r in c.execute(_VERSION_SELECT + " WHERE d.tenant_id = ?",
                                                                (tenant_id,))]
            if c.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,)).rowcount == 0:
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
                delta_id = c.execute("INSERT INTO deltas (tenant_id, name, next_version, created) VALUES (?,?,?,?)",
                                     (tenant_id, name, version + 1, now)).lastrowid
            else:
                delta_id = row["id"]
            c.execute("UPDATE deltas SET next_version = ? WHERE id = ?", (version + 1, delta_id))
            c.execute("INSERT INTO versions (delta_id, version, digest, size, kinds, max_rank, max_width, "
                      "source_format, description, labels, created, num_parameters) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (delta_id, version, digest, size, json.dumps(sorted(kinds)), max_rank, max_width,
                       source_format, description, json.dumps(labels, sort_keys=True), now, num_parameters))
            c.execute("DELETE FROM blob_gc WHERE digest = ?", (digest,))
        return DeltaVersion(tenant_id, name, version, digest, size, tuple(sorted(kinds)), max_rank, max_width,
                            source_format, description, dict(labels), now, num_parameters=num_parameters)

    def check_quota(self, tenant_id: str, name: str, size: int = 0) -> None:
        """ResourceExhausted if a new version of ``name`` of ``size`` bytes would break the tenant's quotas
        now (before an upload is read: ``add_version`` checks again, atomically, before it commits)."""
        with self.read() as c:
            self._check_quotas(c, tenant_id, name, size)

    @staticmethod
    def _check_quotas(c: sqlite3.Connection, tenant_id: str, name: str, size: int):
        """The quotas for a new version of ``name``; returns the name's ``deltas`` row (None: a new name)."""
        t = c.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        if t is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        row = c.execute("SELECT id, next_version FROM deltas WHERE tenant_id = ? AND name = ?",
                        (tenant_id, name)).fetchone()
        if row is None:
            count = c.execute("SELECT COUNT(*) FROM deltas WHERE tenant_id = ?", (tenant_id,)).fetchone()[0]
            if count + 1 > t["max_deltas"]:
                raise ResourceExhausted(f"tenant {t['name']!r}: delta quota reached ({count} of "
                                        f"{t['max_deltas']}); delete one first")
        used = c.execute("SELECT COALESCE(SUM(v.size), 0) FROM versions v JOIN deltas d ON d.id = v.delta_id "
                         "WHERE d.tenant_id = ?", (tenant_id,)).fetchone()[0]
        if used + max(size, 1) > t["max_bytes"]:  # size 0: before the upload is read, any version needs a byte
            raise ResourceExhausted(f"tenant {t['name']!r}: storage quota exceeded ({used} + {size} bytes > "
                                    f"{t['max_bytes']})" if size else
                                    f"tenant {t['name']!r}: storage quota full ({used} of {t['max_bytes']} bytes)")
        return row

    # -- version numbers: never reused (the high-water mark outlives every version of the name) --------
    @staticmethod
    def _next_version(c: sqlite3.Connection, tenant_id: str, name: str, row) -> int:
        mark = c.execute("SELECT last_version FROM version_marks WHERE tenant_id = ? AND name = ?",
                         (tenant_id, name)).fetchone()
        version = max(row["next_version"] if row is not None else 1, (mark[0] if mark else 0) + 1)
        c.execute("INSERT INTO version_marks VALUES (?,?,?) ON CONFLICT (tenant_id, name) DO UPDATE SET "
                  "last_version = MAX(last_version, excluded.last_version)", (tenant_id, name, version))
        return version

    def resolve(self, tenant_id: str, name: str, version: int | None) -> DeltaVersion | None:
        sql = _VERSION_SELECT + " WHERE d.tenant_id = ? AND d.name = ?"
        args: tuple = (tenant_id, name)
        if version is None:
            sql += " ORDER BY v.version DESC LIMIT 1"
        else:
            sql += " AND v.version = ?"
            args += (version,)
        row = self._conn().execute(sql, args).fetchone()
        return None if row is None else DeltaVersion.from_row(row)

    def versions(self, tenant_id: str, name: str) -> list[DeltaVersion]:
        rows = self._conn().execute(_VERSION_SELECT + " WHERE d.tenant_id = ? AND d.name = ? ORDER BY v.version",
                                    (tenant_id, name))
        return [DeltaVersion.from_row(r) for r in rows]

    def list_latest(self, tenant_id: str, after: str, limit: int) -> list[DeltaVersion]:
        """The latest version of each delta of a tenant, by name, starting after ``after``."""
        rows = self._conn().execute(
            _VERSION_SELECT + " WHERE d.tenant_id = ? AND d.name > ? AND v.version = "
            "(SELECT MAX(version) FROM versions WHERE delta_id = d.id) ORDER BY d.name LIMIT ?",
            (tenant_id, after, limit))
        return [DeltaVersion.from_row(r) for r in rows]

    def usage(self, tenant_id: str) -> tuple[int, int]:
        """(number of deltas, bytes stored) for a tenant."""
        c = self._conn()
        n = c.execute("SELECT COUNT(*) FROM deltas WHERE tenant_id = ?", (tenant_id,)).fetchone()[0]
        b = c.execute("SELECT COALESCE(SUM(v.size), 0) FROM versions v JOIN deltas d ON d.id = v.delta_id "
                      "WHERE d.tenant_id = ?", (tenant_id,)).fetchone()[0]
        return n, b

    def delete(self, tenant_id: str, name: str, version: int | None) -> list[DeltaVersion]:
        """Delete one version, or every version of ``name``; returns what was deleted."""
        with self.write() as c:
            sql = _VERSION_SELECT + " WHERE d.tenant_id = ? AND d.name = ?"
            args: tuple = (tenant_id, name)
            if version is not None:
                sql, args = sql + " AND v.version = ?", args + (version,)
            gone = [DeltaVersion.from_row(r) for r in c.execute(sql, args)]
            if not gone:
                return []
            delta_id = c.execute("SELECT id FROM deltas WHERE tenant_id = ? AND name = ?",
                                 (tenant_id, name)).fetchone()[0]
            if version is None:
                c.execute("DELETE FROM deltas WHERE id = ?", (delta_id,))
            else:
                c.execute("DELETE FROM versions WHERE delta_id = ? AND version = ?", (delta_id, version))
                if c.execute("SELECT 1 FROM versions WHERE delta_id = ?", (delta_id,)).fetchone() is None:
                    c.execute("DELETE FROM deltas WHERE id = ?", (delta_id,))
            self._queue_gc(c, [v.digest for v in gone])
        return gone

    def exists(self, tenant_id: str, name: str, version: int, digest: str) -> bool:
        return self._conn().execute(
            "SELECT 1 FROM versions v JOIN deltas d ON d.id = v.delta_id WHERE d.tenant_id = ? AND d.name = ? "
            "AND v.version = ? AND v.digest = ?", (tenant_id, name, version, digest)).fetchone() is not None

    def add_usage(self, usage: dict[tuple[str, str, int, str], tuple[int, int, float]]) -> None:
        """Add request/token counters and bump last-used, for many versions in one transaction."""
        with self.write() as c:
            for (tenant_id, name, version, digest), (requests, tokens, last_used) in usage.items():
                c.execute("UPDATE versions SET requests = requests + ?, tokens = tokens + ?, "
                          "last_used = MAX(COALESCE(last_used, 0), ?) WHERE version = ? AND digest = ? AND "
                          "delta_id = (SELECT id FROM deltas WHERE tenant_id = ? AND name = ?)",
                          (requests, tokens, last_used, version, digest, tenant_id, name))

    def digests_without_parameter_count(self) -> list[str]:
        """Digests of versions a schema-1 server wrote (no ``num_parameters`` yet)."""
        return [r[0] for r in self._conn().execute("SELECT DISTINCT digest FROM versions WHERE num_parameters IS NULL")]

    def set_parameter_count(self, digest: str, num_parameters: int) -> None:
        with self.write() as c:
            c.execute("UPDATE versions SET num_parameters = ? WHERE digest = ? AND num_parameters IS NULL",
                      (num_parameters, digest))

    # -- blob collection ------------------------------------------------------------------------------
    @staticmethod
    def _queue_gc(c: sqlite3.Connection, digests: list[str]) -> None:
        now = time.time()
        c.executemany("INSERT OR IGNORE INTO blob_gc VALUES (?, ?)", [(d, now) for d in set(digests)])

    def referenced_digests(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT DISTINCT digest FROM versions")}

    def gc_queue(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT digest FROM blob_gc")]

    def collect(self, digest: str, delete_blob: Callable[[str], None]) -> bool:
        """Delete the blob if no version references it, under the write lock (so no put can race in
        between the check and the delete); True if deleted. A crash after the unlink and before the
        commit leaves a queue entry for a missing blob, which the next collection just drops."""
        with self.write() as c:
            if c.execute("SELECT 1 FROM versions WHERE digest = ? LIMIT 1", (digest,)).fetchone():
                c.execute("DELETE FROM blob_gc WHERE digest = ?", (digest,))
                return False
            delete_blob(digest)
            c.execute("DELETE FROM blob_gc WHERE digest = ?", (digest,))
            return True
