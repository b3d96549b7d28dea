"""Several stores sharing one PostgreSQL catalogue and one S3 bucket, as replicas do: what one writes the
others see at once, racing writers lose nothing, quotas hold across them, and an outage of either
service fails fast and heals by itself. (The same scenarios through nginx and real servers are in
tests/test_replicas_*.py.)"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time

import pytest

from delta_store import BaseSpec, DeltaStore
from delta_store.blob_cache import BlobCache
from delta_store.catalogue import Catalogue
from delta_store.errors import CorruptBlob, NotFound, ResourceExhausted, Unauthenticated, Unavailable
from delta_store.native import dump_native
from delta_store.s3_blobs import S3Blobs
from delta_store.validate import Limits
from tests.helpers import random_delta, store_settings, tenant_quotas, tiny_llama
from tests.services import MotoS3

LIMITS = Limits(max_rank=8)


@pytest.fixture(scope="module")
def spec():
    return BaseSpec.from_model(tiny_llama(seed=4))


@pytest.fixture(scope="module")
def payloads(spec, tmp_path_factory):
    d = tmp_path_factory.mktemp("payloads")
    out = []
    for seed in range(12):
        f = d / f"p{seed}.safetensors"
        f.write_bytes(dump_native(random_delta(spec, rank=2, seed=seed)))
        out.append(f)
    return out


@pytest.fixture
def replicas(tmp_path, spec, postgres, moto_s3):
    """Three stores on one fresh database and one fresh bucket, each with its own data dir and disk cache."""
    url, bucket = postgres.database(), moto_s3.bucket()
    stores = []
    for i in range(3):
        root = tmp_path / f"replica{i}"
        blobs = S3Blobs(bucket, "deltas/", client=moto_s3.client(), cache=BlobCache(root / "blob-cache", 1 << 20))
        stores.append(DeltaStore(root, spec, LIMITS, store_settings(host_cache_bytes=0), blobs=blobs,
                                 catalogue=Catalogue(url)))
    yield stores
    for s in stores:
        s.close()


def run_together(fns) -> list:
    """Start every ``fn`` at once (a barrier); each result is its return value or the exception it raised."""
    barrier = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def one(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_what_one_replica_writes_the_others_serve_and_a_delete_is_seen_everywhere(replicas, payloads):
    a, b, c = replicas
    tenant, _ = a.tenants.create("acme")
    v1 = a.put(tenant.id, "qa", payloads[0])
    for other in (b, c):  # no cache to refresh: the catalogue and the bucket are the truth
        assert other.resolve(tenant.id, "qa") == v1
        assert dump_native(other.load_key(v1.key)) == payloads[0].read_bytes()
    v2 = b.put(tenant.id, "qa", payloads[1])
    assert a.resolve(tenant.id, "qa") == v2 and c.resolve(tenant.id, "qa@1") == v1
    c.delete(tenant.id, "qa")
    for store in replicas:
        with pytest.raises(NotFound):
            store.resolve(tenant.id, "qa")
        with pytest.raises(NotFound):  # a key resolved before the delete is refused after it
            store.load_key(v2.key)
    assert list(a.blobs.iter()) == [], "the deleting replica collected both blobs from the bucket"


def test_racing_creates_of_one_name_end_with_two_versions(replicas, payloads):
    a, b, _ = replicas
    tenant, _ = a.tenants.create("acme")
    got = run_together([lambda: a.put(tenant.id, "qa", payloads[2]), lambda: b.put(tenant.id, "qa", payloads[3])])
    assert not [r for r in got if isinstance(r, Exception)], got
    assert sorted(v.version for v in got) == [1, 2]
    assert {v.digest for v in a.versions(tenant.id, "qa")} == {v.digest for v in got}, "no write lost"


def test_quotas_hold_across_replicas_under_concurrent_uploads(replicas, payloads):
    a = replicas[0]
    tenant, _ = a.tenants.create("acme", quotas=tenant_quotas(max_deltas=4))
    fns = [lambda s=s, k=k: s.put(tenant.id, f"d{k}", payloads[k]) for k, s in
           enumerate(replicas[i % 3] for i in range(9))]
    got = run_together(fns)
    ok = [r for r in got if not isinstance(r, Exception)]
    refused = [r for r in got if isinstance(r, ResourceExhausted)]
    assert len(ok) == 4 and len(refused) == 5, got
    assert a.catalogue.usage(tenant.id)[0] == 4
    size = ok[0].size
    a.tenants.set_quotas(tenant.id, max_deltas=100, max_bytes=sum(v.size for v in ok) + 2 * size + size // 2)
    got = run_together([lambda s=s, k=k: s.put(tenant.id, "big", payloads[k]) for k, s in
                        zip(range(4, 10), [replicas[i % 3] for i in range(6)])])
    assert sum(not isinstance(r, Exception) for r in got) == 2 and \
        sum(isinstance(r, ResourceExhausted) for r in got) == 4, got


def test_tenants_and_keys_changed_on_one_replica_hold_on_all_at_once(replicas):
    a, b, c = replicas
    tenant, key = a.tenants.create("acme")
    assert b.tenants.authenticate(key).id == tenant.id
    new_key = c.tenants.rotate_key(tenant.id)
    with pytest.raises(Unauthenticated):
        a.tenants.authenticate(key)
    assert a.tenants.authenticate(new_key).id == tenant.id
    b.tenants.delete(tenant.id)
    with pytest.raises(Unauthenticated):
        c.tenants.authenticate(new_key)


def test_replicas_starting_together_migrate_once(postgres):
    url = postgres.database()
    got = run_together([lambda: Catalogue(url) for _ in range(4)])
    assert all(isinstance(c, Catalogue) for c in got), got
    assert {c.revision for c in got} == {got[0].revision}
    for c in got:
        c.close()


def test_a_blob_missing_from_the_bucket_fails_its_load_only(replicas, payloads):
    a, b, _ = replicas
    tenant, _ = a.tenants.create("acme")
    gone = a.put(tenant.id, "gone", payloads[4])
    kept = a.put(tenant.id, "kept", payloads[5])
    a.blobs.client.delete_object(Bucket=a.blobs.bucket, Key=a.blobs.key(gone.digest))
    with pytest.raises(CorruptBlob, match="missing from s3://"):
        b.load_key(gone.key)
    assert b.load_key(kept.key) is not None
    assert [p.split(":")[0] for p in b.verify()] == [gone.digest[:12]]


def test_postgres_restart_fails_fast_then_heals_by_itself(replicas, postgres, payloads):
    a, b, _ = replicas
    tenant, key = a.tenants.create("acme")
    v = a.put(tenant.id, "qa", payloads[6])
    postgres.stop()
    try:
        for store in (a, b):
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match=r"catalogue unavailable \(postgresql 127\.0\.0\.1:"):
                store.resolve(tenant.id, "qa")
            assert time.monotonic() - t0 < 2.0, "a request must not hang on a database that is down"
        time.sleep(1.0)  # past the usage flush interval: the next record_usage tries to write
        a.record_usage(v.key, requests=2, tokens=7)  # a finished request's counters: kept, never an error
    finally:
        postgres.start()
    assert b.tenants.authenticate(key).id == tenant.id, "the pool reconnects by itself"
    got = a.get(tenant.id, "qa")  # flushes what waited through the outage
    assert (got.requests, got.tokens) == (2, 7)
    with pytest.raises(NotFound):
        a.resolve(tenant.id, "nope")


FORK = multiprocessing.get_context("fork")  # a forked child starts in ms and inherits spec and payloads


def _writer(url, bucket, endpoint, root, spec, tenant_id, payloads, log_path, seed):
    """Puts and deletes until SIGKILL, logging each put after it returns (half upload fresh bytes)."""
    rng = random.Random(seed)
    client = MotoS3.client_for(endpoint)
    store = DeltaStore(root, spec, LIMITS, store_settings(), blobs=S3Blobs(bucket, "deltas/", client=client),
                       catalogue=Catalogue(url))
    with open(log_path, "a") as log:
        for i in range(10 ** 9):
            payload = rng.choice(payloads)
            if rng.random() < 0.5:
                payload = root / f"fresh-{i}.safetensors"
                payload.write_bytes(dump_native(random_delta(spec, rank=2, seed=seed * 100_000 + i)))
            name = f"d{rng.randrange(4)}"
            if rng.random() < 0.15:
                log.write(f"del {name}\n")  # intent first: the delete may commit before we log again
                log.flush()
                try:
                    store.delete(tenant_id, name)
                except NotFound:
                    pass
            else:
                v = store.put(tenant_id, name, payload)
                log.write(f"put {v.name} {v.version} {v.digest}\n")
                log.flush()


def puts_logged(log_path) -> int:
    return log_path.read_text().count("put ") if log_path.exists() else 0


def test_sigkilled_writers_leave_catalogue_and_bucket_consistent(tmp_path, spec, payloads, postgres, moto_s3):
    url, bucket = postgres.database(), moto_s3.bucket()

    def open_store(root, **settings):
        blobs = S3Blobs(bucket, "deltas/", client=moto_s3.client())
        return DeltaStore(root, spec, LIMITS, store_settings(**settings), blobs=blobs, catalogue=Catalogue(url))

    with open_store(tmp_path / "setup") as store:
        tenant_id = store.tenants.create("t")[0].id
    log_path = tmp_path / "ops.log"
    rng = random.Random(99)
    for round_ in range(4):
        root = tmp_path / f"w{round_}"
        root.mkdir()
        child = FORK.Process(target=_writer, args=(url, bucket, moto_s3.endpoint, root, spec, tenant_id, payloads[:6],
                                                   log_path, round_))
        logged = puts_logged(log_path)
        child.start()
        deadline = time.monotonic() + 30  # opening a store sweeps the bucket first: up to ~1 s here
        while puts_logged(log_path) == logged and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))  # then somewhere in the middle of the next put or delete
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with open_store(tmp_path / "check", orphan_grace_s=0, host_cache_bytes=0) as store:
            assert store.verify() == [], "every version's blob is whole in the bucket"
            assert set(store.blobs.iter()) == store.catalogue.referenced_digests(), "no orphan or missing blob"
            expected: dict[tuple[str, int], str] = {}
            for line in log_path.read_text().splitlines():
                op, name, *rest = line.split()
                if op == "del":
                    expected = {k: d for k, d in expected.items() if k[0] != name}
                else:
                    expected[(name, int(rest[0]))] = rest[1]
            for (name, version), digest in expected.items():
                assert store.resolve(tenant_id, f"{name}@{version}").digest == digest
    assert puts_logged(log_path) >= 4, "the writers did no real work; the test proved little"


def _put_and_die_before_commit(url, bucket, endpoint, root, spec, tenant_id, payload):
    store = DeltaStore(root, spec, LIMITS, store_settings(),
                       blobs=S3Blobs(bucket, "deltas/", client=MotoS3.client_for(endpoint)), catalogue=Catalogue(url))

    def die(*args, **kwargs):
        os._exit(9)  # the blob is in the bucket, its row never commits

    store.catalogue.add_version = die
    store.put(tenant_id, "half", payload)


def test_a_dead_writers_blob_in_the_bucket_is_collected_when_its_replica_restarts(tmp_path, spec, payloads, postgres,
                                                                                   moto_s3):
    """The scratch markers work with S3 blobs too: the replica's own data dir says which blob its dead
    writer left uncommitted, so the restart removes it at once (not after orphan_grace_s) and leaves no
    scratch file; another replica's blobs are not touched."""
    url, bucket = postgres.database(), moto_s3.bucket()

    def open_store(root):
        blobs = S3Blobs(bucket, "deltas/", client=moto_s3.client())
        return DeltaStore(root, spec, LIMITS, store_settings(orphan_grace_s=3600), blobs=blobs,
                          catalogue=Catalogue(url))

    with open_store(tmp_path / "other") as other:
        tenant_id = other.tenants.create("t")[0].id
        kept = other.put(tenant_id, "kept", payloads[0])
    root = tmp_path / "replica"
    child = FORK.Process(target=_put_and_die_before_commit,
                         args=(url, bucket, moto_s3.endpoint, root, spec, tenant_id, payloads[1]))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    with open_store(tmp_path / "probe") as probe:  # another replica's start leaves a young orphan alone
        assert len(set(probe.blobs.iter())) == 2
    with open_store(root) as store:
        assert set(store.blobs.iter()) == {kept.digest}, "the dead writer's blob waited for orphan_grace_s"
        assert [p for p in (root / "tmp").iterdir()] == []
        assert store.resolve(tenant_id, "kept").digest == kept.digest
