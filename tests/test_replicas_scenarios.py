"""Three real replicas (subprocesses) sharing a real PostgreSQL catalogue and an S3 bucket (moto's server),
behind a real nginx running the shipped deploy/nginx config: the issue's scenarios end to end.

One replica set per module (startup ~30-50 s on 2 cores); each test takes its own tenant. The SIGKILL
scenario runs last, so no test after it needs the killed replica back."""
from __future__ import annotations

import hashlib
import re
import threading
import time

import grpc
import pytest

from delta_store.catalogue import Catalogue
from server.client import REPLICA_HEADER, Client
from server.demo import build_demo_model
from tests.replica_harness import ReplicaSet
from tests.server_harness import PROMPT, greedy, peft_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("model") / "demo", hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_dir, postgres, moto_s3):
    from tests.deploy_helpers import nginx_binary
    from tests.services import missing

    if nginx_binary() is None:
        missing("nginx", "apt-get install -y nginx")
    replicas = ReplicaSet(tmp_path_factory.mktemp("replicas"), model_dir, postgres, moto_s3, n=3)
    yield replicas
    replicas.close()


@pytest.fixture(scope="module")
def loras(model_dir):
    """Three PEFT LoRAs (tar.gz bytes) and their merged models (the greedy oracle)."""
    return [peft_lora(model_dir, seed=s) for s in (11, 12, 13)]


_tenants = iter(range(10 ** 6))
_names: dict[str, str] = {}  # api key -> tenant name


def tenant(cluster, **quotas) -> str:
    """A new tenant's API key (a tenant per test: nothing one test does shows in another)."""
    name = f"t{next(_tenants)}"
    with Client(cluster.front, cluster.admin_key, timeout=30) as admin:
        key = admin.create_tenant(name, quotas=quotas)[1]
    _names[key] = name
    return key


def tokens_and_replica(address: str, key: str, delta: str, n: int = 6) -> tuple[list[int], str]:
    with Client(address, key, timeout=60) as c:
        call = c.generate(PROMPT, delta=delta, max_new_tokens=n, temperature=0.0, ignore_eos=True)
        toks = [t for chunk in call for t in chunk.token_ids]
        return toks, dict(call.initial_metadata())[REPLICA_HEADER]


def code_of(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def run_together(fns) -> list:
    barrier = threading.Barrier(len(fns))
    out: list = [None] * len(fns)

    def one(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except Exception as exc:  # noqa: BLE001 - returned for the test to look at
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_upload_through_nginx_then_every_replica_serves_the_same_tokens(cluster, loras):
    key = tenant(cluster)
    data, merged = loras[0]
    with Client(cluster.front, key, timeout=60) as c:
        assert c.upload("style", data).version == 1
    expected = greedy(merged, PROMPT, 6)
    served = [tokens_and_replica(r.address, key, "style") for r in cluster.replicas]
    assert [toks for toks, _ in served] == [expected] * 3
    assert [replica for _, replica in served] == [r.id for r in cluster.replicas], "each replica answers for itself"
    via_front = {tokens_and_replica(cluster.front, key, "style")[1] for _ in range(4)}
    assert len(via_front) == 1, f"delta affinity: one delta, one replica through nginx, got {via_front}"


def test_delete_on_one_replica_is_not_found_on_every_replica(cluster, loras):
    key = tenant(cluster)
    with Client(cluster[0].address, key, timeout=60) as c:
        c.upload("qa", loras[1][0])
    for r in cluster.replicas:  # resident in every replica's device memory now
        assert tokens_and_replica(r.address, key, "qa")[0]
    with Client(cluster[1].address, key, timeout=60) as c:
        assert c.delete_delta("qa") == 1
    for address in [r.address for r in cluster.replicas] + [cluster.front]:
        for ref in ("qa", "qa@1"):
            err = code_of(lambda: tokens_and_replica(address, key, ref))
            assert err.code() == grpc.StatusCode.NOT_FOUND, (address, ref, err.details())


def test_two_replicas_racing_to_create_one_name_end_with_two_versions(cluster, loras):
    key = tenant(cluster)

    def upload(replica, data):
        with Client(replica.address, key, timeout=60) as c:
            return c.upload("race", data).version

    got = run_together([lambda: upload(cluster[0], loras[0][0]), lambda: upload(cluster[1], loras[1][0])])
    assert sorted(got) == [1, 2], got
    with Client(cluster[2].address, key, timeout=60) as c:
        info = c.get_delta("race")
    assert [v.version for v in info.versions] == [1, 2]
    assert len({v.digest for v in info.versions}) == 2, "both writes are there, neither lost"


def test_quota_holds_across_replicas_under_concurrent_uploads(cluster, loras):
    key = tenant(cluster, max_deltas=3)

    def upload(replica, name, data):
        with Client(replica.address, key, timeout=60) as c:
            return c.upload(name, data).version

    got = run_together([lambda i=i: upload(cluster[i % 3], f"d{i}", loras[i % 3][0]) for i in range(7)])
    refused = [r for r in got if isinstance(r, grpc.RpcError)]
    assert sum(r == 1 for r in got) == 3 and len(refused) == 4, got
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in r.details() for r in refused)
    with Client(cluster.front, key, timeout=60) as c:
        assert len(c.list_deltas()) == 3


def test_a_blob_missing_or_corrupt_in_s3_fails_its_requests_and_is_marked(cluster, model_dir, moto_s3):
    key = tenant(cluster)
    fresh = [peft_lora(model_dir, seed=s)[0] for s in (21, 22, 23)]  # blobs no replica has seen (content-addressed)
    with Client(cluster[0].address, key, timeout=60) as c:  # replica 0 keeps them warm; 1 and 2 have none
        lost = c.upload("lost", fresh[0])
        broken = c.upload("broken", fresh[1])
        fine = c.upload("fine", fresh[2])
    s3 = moto_s3.client()
    prefix = "deltas/blobs"
    s3.delete_object(Bucket=cluster.bucket, Key=f"{prefix}/{lost.digest[:2]}/{lost.digest}")
    body = bytearray(s3.get_object(Bucket=cluster.bucket, Key=f"{prefix}/{broken.digest[:2]}/{broken.digest}")["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=cluster.bucket, Key=f"{prefix}/{broken.digest[:2]}/{broken.digest}", Body=bytes(body))
    r1 = cluster[1]
    for ref, why in (("lost", "missing from s3://"), ("broken", "corrupt in s3://")):
        err = code_of(lambda: tokens_and_replica(r1.address, key, ref))
        assert err.code() == grpc.StatusCode.DATA_LOSS and f"delta {ref}@1" in err.details() and why in err.details()
        t0 = time.monotonic()
        again = code_of(lambda: tokens_and_replica(r1.address, key, ref))
        assert again.code() == grpc.StatusCode.DATA_LOSS and time.monotonic() - t0 < 5
    assert tokens_and_replica(r1.address, key, "fine")[0], "the other deltas keep serving"
    assert re.search(r"^deltaserve_blobs_damaged 2\.0$", r1.metrics(), re.M), "the replica counts what it marked"
    assert tokens_and_replica(cluster[0].address, key, "lost")[0], "a replica that still holds the delta serves it"
    assert fine.version == 1
    with Client(cluster.front, cluster.admin_key, timeout=60) as admin:  # the bucket whole again for later tests
        admin.delete_tenant(_names[key])


def test_postgres_restarted_under_load_fails_fast_then_recovers_by_itself(cluster, loras, postgres):
    key = tenant(cluster)
    with Client(cluster.front, key, timeout=60) as c:
        c.upload("steady", loras[2][0])
    results: list[tuple[float, float, str]] = []  # (start, seconds, "ok" or the status code name)
    stop = threading.Event()

    def load():
        with Client(cluster.front, key, timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    call = c.generate(PROMPT, delta="steady", max_new_tokens=4, temperature=0.0, ignore_eos=True)
                    list(call)
                    outcome = "ok"
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                results.append((t0, time.monotonic() - t0, outcome))
                time.sleep(0.02)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(2.0)
        down = time.monotonic()
        postgres.stop()
        time.sleep(3.0)
        postgres.start()
        up = time.monotonic()
        deadline = up + 30
        while time.monotonic() < deadline and not any(o == "ok" and t0 > up for t0, _, o in list(results)):
            time.sleep(0.1)
        time.sleep(2.0)  # then two more seconds of load
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    before = [o for t0, _, o in results if t0 < down - 0.5]
    during = [(s, o) for t0, s, o in results if down + 0.5 < t0 < up - 0.5]
    healed = min((t0 for t0, _, o in results if o == "ok" and t0 > up), default=None)
    assert before and set(before) == {"ok"}, before
    assert during and {o for _, o in during} == {"UNAVAILABLE"}, during
    assert max(s for s, _ in during) < 3.0, "requests fail fast while the catalogue is down, never hang"
    assert healed is not None and healed - up < 10, "no recovery without restarting the replicas"
    after = [o for t0, _, o in results if t0 > healed + 0.5]
    assert len(after) >= 3 and set(after) == {"ok"}, after


def test_sigkill_one_replica_mid_load(cluster, loras, moto_s3):
    """Last in the module: the killed replica stays down.

    A stream cut by the replica's death ends at once: UNAVAILABLE on a direct connection; through nginx,
    which can only reset the HTTP/2 stream (a dead upstream sends no gRPC trailers), as gRPC's INTERNAL
    "Received RST_STREAM". Neither hangs."""
    key = tenant(cluster)
    with Client(cluster.front, key, timeout=60) as c:
        c.upload("long", loras[0][0])
    victim = cluster.by_id(tokens_and_replica(cluster.front, key, "long", n=1)[1])  # "long" hashes to it
    outcomes: dict[str, tuple[str, str, float]] = {}
    started = threading.Barrier(5, timeout=60)  # three streams, the upload loop and this thread

    def stream(tag, address):
        with Client(address, key, timeout=120) as c:
            call = c.generate(PROMPT, delta="long", max_new_tokens=400, temperature=0.0, ignore_eos=True)
            it = iter(call)
            try:
                next(it)  # in flight on the victim
                assert dict(call.initial_metadata())[REPLICA_HEADER] == victim.id
            finally:
                started.wait()
            try:
                for _ in it:
                    pass
                outcomes[tag] = ("OK", "", time.monotonic())
            except grpc.RpcError as exc:
                outcomes[tag] = (exc.code().name, exc.details() or "", time.monotonic())

    uploads_done = []

    def upload_loop():  # uploads to the victim itself, one done before the kill and one running when it lands
        with Client(victim.address, key, timeout=30) as c:
            try:
                for i in range(1000):
                    c.upload(f"u{i}", loras[i % 3][0])
                    uploads_done.append(i)
                    if i == 0:
                        started.wait()
            except grpc.RpcError:
                return
            finally:
                if not uploads_done:
                    started.wait()

    threads = [threading.Thread(target=stream, args=(tag, address)) for tag, address in
               (("front-1", cluster.front), ("front-2", cluster.front), ("direct", victim.address))]
    threads.append(threading.Thread(target=upload_loop))
    for t in threads:
        t.start()
    started.wait()  # every stream has its first tokens
    time.sleep(0.3)
    killed_at = time.monotonic()
    victim.kill()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 3 and not any(t.is_alive() for t in threads), "a call hung after the kill"
    assert outcomes["direct"][0] == "UNAVAILABLE", outcomes
    for tag in ("front-1", "front-2"):
        code, details, _ = outcomes[tag]
        assert (code, "RST_STREAM" in details) == ("INTERNAL", True), outcomes
    assert max(t for _, _, t in outcomes.values()) - killed_at < 10, "in-flight calls end within seconds"
    # new requests through nginx: the next replica on the ring serves the dead one's deltas
    toks, replica = tokens_and_replica(cluster.front, key, "long", n=4)
    assert toks and replica != victim.id
    for _ in range(3):
        assert tokens_and_replica(cluster.front, key, "long", n=2)[1] != victim.id
    # nothing half-written: every catalogue row has a whole blob, every object hashes to its name
    cat = Catalogue(cluster.catalogue_url)
    s3 = moto_s3.client()
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket, Prefix="deltas/blobs/"):
        for obj in page.get("Contents", ()):
            body = s3.get_object(Bucket=cluster.bucket, Key=obj["Key"])["Body"].read()
            objects[obj["Key"].rpartition("/")[2]] = hashlib.sha256(body).hexdigest()
    assert all(name == digest for name, digest in objects.items()), "an object is not what its name says"
    assert cat.referenced_digests() <= set(objects), "a catalogue row points at a missing blob"
    assert uploads_done, "the uploads never got going; the kill proved little"
    cat.close()
