"""Catalogue and tenants: keys stored as hashes, versions and ``name@N``, isolation, paging, usage, deletes;
schema revisions. Each store test runs on SQLite and on PostgreSQL (a real server, tests/services.py;
the ``catalogue_target`` fixture of conftest.py)."""
from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa

from delta_store import BaseSpec, DeltaStore
from delta_store.catalogue import Catalogue
from delta_store.database import head_revision
from delta_store.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from delta_store.native import dump_native
from delta_store.records import TenantQuotas
from delta_store.tenants import hash_key
from delta_store.validate import Limits
from tests.helpers import random_delta, store_settings, tenant_quotas, tiny_llama


@pytest.fixture(scope="module")
def spec():
    return BaseSpec.from_model(tiny_llama(seed=4))


@pytest.fixture
def store(tmp_path, spec, catalogue_target):
    with DeltaStore.open(tmp_path / "data", spec, Limits(max_rank=8),
                         store_settings(default_quotas=tenant_quotas(max_deltas=50)),
                         catalogue=Catalogue(catalogue_target)) as s:
        yield s


def stored_text(store) -> bytes:
    """Everything the catalogue holds about tenants, as the database stores it."""
    if store.catalogue.dialect == "sqlite":
        return (store.data_dir / "catalogue.sqlite3").read_bytes() + (store.data_dir / "catalogue.sqlite3-wal").read_bytes()
    with store.catalogue.read() as c:
        return repr(c.execute(sa.text("SELECT * FROM tenants")).all()).encode()


@pytest.fixture(scope="module")
def payloads(spec, tmp_path_factory):
    d = tmp_path_factory.mktemp("payloads")
    out = []
    for seed in range(3):
        f = d / f"p{seed}.safetensors"
        f.write_bytes(dump_native(random_delta(spec, rank=2, seed=seed)))
        out.append(f)
    return out


def test_tenant_keys_are_random_and_stored_only_as_hashes(store):
    tenant, key = store.tenants.create("acme", quotas=tenant_quotas(max_deltas=3))
    admin, admin_key = store.tenants.create("root", is_admin=True)
    assert key.startswith("ds_") and len(key) == 3 + 43 and key != admin_key
    assert store.tenants.get_by_key(key) == tenant and store.tenants.authenticate(admin_key).is_admin
    assert store.tenants.get_by_key("ds_" + "A" * 43) is None and store.tenants.get_by_key("nope") is None
    with pytest.raises(Unauthenticated):
        store.tenants.authenticate("ds_wrong")
    raw = stored_text(store)
    assert key.encode() not in raw and hash_key(key).encode() in raw
    new_key = store.tenants.rotate_key(tenant.id)
    assert store.tenants.get_by_key(key) is None and store.tenants.get_by_key(new_key).id == tenant.id
    assert store.tenants.get(tenant.id).quotas.max_deltas == 3
    assert store.tenants.set_quotas(tenant.id, tokens_per_minute=7).quotas == tenant_quotas(max_deltas=3, tokens_per_minute=7)
    with pytest.raises(InvalidArgument, match="unknown quota"):
        store.tenants.set_quotas(tenant.id, max_cats=1)
    with pytest.raises(InvalidArgument, match="quota max_bytes"):
        tenant_quotas(max_bytes=-1)
    with pytest.raises(AlreadyExists):
        store.tenants.create("acme")
    with pytest.raises(InvalidArgument):
        store.tenants.create("../acme")
    assert [t.name for t in store.tenants.list()] == ["acme", "root"]


def test_versions_refs_and_tenant_isolation(store, payloads):
    a, _ = store.tenants.create("a")
    b, _ = store.tenants.create("b")
    v1 = store.put(a, "qa", payloads[0])
    v2 = store.put(a, "qa", payloads[1])
    assert (v1.version, v2.version) == (1, 2) and v1.digest != v2.digest
    assert store.resolve(a, "qa") == v2 and store.resolve(a, "qa@1") == v1
    assert v1.key.digest == v1.digest and v1.ref == "qa@1"
    for ref in ("qa", "qa@1"):
        with pytest.raises(NotFound):  # b cannot see a's delta, and the error does not tell it exists
            store.resolve(b, ref)
    with pytest.raises(NotFound):
        store.resolve(a, "qa@3")
    for bad in ("qa@0", "qa@-1", "qa@x", "qa@01", "qa@1@2"):
        with pytest.raises(InvalidArgument):
            store.resolve(a, bad)
    assert [v.version for v in store.versions(a, "qa")] == [1, 2]
    # deleting one version keeps the others; the numbering never reuses a number
    told = []
    store.subscribe(told.append)
    assert store.delete(a, "qa@2") == [v2] and told == [[v2]]
    assert store.resolve(a, "qa") == v1
    assert store.put(a, "qa", payloads[2]).version == 3
    with pytest.raises(NotFound):
        store.delete(b, "qa")
    assert store.resolve(a, "qa").version == 3


def test_list_pages_through_latest_versions(store, payloads):
    t, _ = store.tenants.create("t")
    names = [f"d{i:02d}" for i in range(7)]
    for n in reversed(names):
        store.put(t, n, payloads[0])
    store.put(t, "d03", payloads[1])
    seen, token = [], ""
    while True:
        page, token = store.list(t, page_size=3, page_token=token)
        seen += page
        if not token:
            break
    assert [v.name for v in seen] == names
    assert next(v for v in seen if v.name == "d03").version == 2
    with pytest.raises(InvalidArgument):
        store.list(t, page_size=0)


def test_usage_counters_and_last_used(store, payloads):
    t, _ = store.tenants.create("t")
    v = store.put(t, "qa", payloads[0])
    for _ in range(3):
        store.record_usage(v.key, requests=1, tokens=10)
    got = store.get(t, "qa")  # flushes the buffered counters first
    assert (got.requests, got.tokens) == (3, 30) and got.last_used >= v.created
    store.record_usage(v.key, requests=2, tokens=5)
    store.close()
    reopened = DeltaStore.open(store.data_dir, store.spec, store.limits, store.settings,
                               catalogue=Catalogue(store.catalogue.url))
    assert reopened.get(t, "qa").requests == 5, "close flushes what was buffered"
    reopened.close()


def test_delete_tenant_removes_its_deltas_and_blobs(store, payloads):
    a, _ = store.tenants.create("a")
    b, _ = store.tenants.create("b")
    va = store.put(a, "x", payloads[0])
    store.put(b, "y", payloads[0])  # same bytes: shared blob
    store.put(a, "z", payloads[1])
    told = []
    store.subscribe(told.append)
    store.tenants.delete(a.id)
    assert sorted(v.ref for v in told[0]) == ["x@1", "z@1"], "subscribers (device slots) hear of it"
    with pytest.raises(NotFound):
        store.tenants.get(a.id)
    assert store.blobs.exists(va.digest) and len(list(store.blobs.iter())) == 1
    with pytest.raises(NotFound):
        store.tenants.delete(a.id)


def test_newer_schema_is_refused(catalogue_target):
    Catalogue(catalogue_target).close()
    engine = sa.create_engine(Catalogue(catalogue_target).url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff0099'"))
    engine.dispose()
    with pytest.raises(FailedPrecondition, match="schema revision ffff0099, which this server does not know"):
        Catalogue(catalogue_target)


# The catalogue as the first (pre-Alembic) deltaserve wrote it, statement for statement.
_FIRST_SCHEMA = """
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
    PRIMARY KEY (delta_id, version));
CREATE INDEX IF NOT EXISTS versions_digest ON versions(digest);
CREATE TABLE IF NOT EXISTS blob_gc (digest TEXT PRIMARY KEY, since REAL NOT NULL);
"""


def _first_schema_catalogue(path, version: int) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(_FIRST_SCHEMA)
    conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute("INSERT INTO tenants VALUES ('t_1', 'acme', ?, 0, 5, 1000, 60, 600, 2, 1.0)", ("ab" * 32,))
    conn.execute("INSERT INTO deltas VALUES (1, 't_1', 'qa', 2, 1.0)")
    conn.execute("INSERT INTO versions VALUES (1, 1, ?, 10, '[\"lora\"]', 2, 0, 'peft', '', '{}', 1.0, NULL, 3, 30)",
                 ("cd" * 32,))
    conn.commit()
    conn.close()


def test_first_sqlite_schema_opens_unchanged_and_a_newer_one_is_refused(tmp_path):
    old = tmp_path / "old.sqlite3"
    _first_schema_catalogue(old, 1)
    cat = Catalogue(old)
    assert cat.revision == head_revision()
    assert cat.tenant(name="acme").quotas == TenantQuotas(5, 1000, 60, 600, 2)
    v = cat.resolve("t_1", "qa", None)
    assert (v.version, v.digest, v.kinds, v.requests) == (1, "cd" * 32, ("lora",), 3)
    assert cat.add_version("t_1", "qa", "ef" * 32, 10, ["lora"], 2, 0, "peft", "", {}, lambda: None).version == 2
    cat.close()
    assert Catalogue(old).resolve("t_1", "qa", None).version == 2, "stamped once, opens again"
    newer = tmp_path / "newer.sqlite3"
    _first_schema_catalogue(newer, 99)
    with pytest.raises(FailedPrecondition, match="schema version 99"):
        Catalogue(newer)
