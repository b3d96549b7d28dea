"""Durability: corrupt blobs refused, leftovers swept at start-up (by owner lock, not by pid), SIGKILL at many random points
leaves a consistent store, and parallel writers/readers (threads and processes) lose nothing.

Child processes are forked (not spawned): a spawned child would re-import torch and transformers
(~3 s each on 2 cores), a forked one starts in milliseconds and inherits the spec and payloads.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import threading
import time

import pytest

from delta_store import BaseSpec, DeltaStore
from delta_store.errors import CorruptBlob
from delta_store.native import digest_bytes, dump_native
from delta_store.scratch import Scratch
from delta_store.validate import Limits
from tests.helpers import random_delta, store_settings, tiny_llama

FORK = multiprocessing.get_context("fork")
LIMITS = Limits(max_rank=8)


@pytest.fixture(scope="module")
def spec():
    return BaseSpec.from_model(tiny_llama(seed=4))


@pytest.fixture(scope="module")
def payloads(spec, tmp_path_factory):
    d = tmp_path_factory.mktemp("payloads")
    out = []
    for seed in range(6):
        f = d / f"p{seed}.safetensors"
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        f.write_bytes(dump_native(random_delta(spec, rank=2 + seed % 3, seed=seed, targets=targets)))
        out.append(f)
    return out


def check_consistent(store: DeltaStore, tenant_id: str) -> list:
    """Every listed version loads from disk and re-hashes to its digest; no leftovers anywhere."""
    assert store.verify() == []
    listed, token = [], ""
    while True:
        page, token = store.list(tenant_id, page_size=50, page_token=token)
        listed += page
        if not token:
            break
    for latest in listed:
        for v in store.versions(tenant_id, latest.name):
            store.host.discard(v.digest)
            assert digest_bytes(dump_native(store.load(v))) == v.digest
    assert set(store.blobs.iter()) == store.catalogue.referenced_digests(), "orphan or missing blobs"
    leftovers = [p for p in (store.data_dir / "blobs").rglob("*") if ".tmp-" in p.name]
    assert leftovers == [] and list((store.data_dir / "tmp").iterdir()) == []
    conn = sqlite3.connect(store.data_dir / "catalogue.sqlite3")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    return listed


def test_corrupt_or_missing_blob_is_refused_never_served(tmp_path, spec, payloads):
    with DeltaStore.open(tmp_path, spec, LIMITS, store_settings()) as store:
        t, _ = store.tenants.create("t")
        v = store.put(t, "qa", payloads[0])
        w = store.put(t, "qb", payloads[1])
        path = store.blobs.path(v.digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor data
        path.write_bytes(bytes(data))
        store.host.discard(v.digest)
        with pytest.raises(CorruptBlob, match="corrupt"):
            store.load(v)
        with pytest.raises(CorruptBlob):
            store.load_key(v.key)
        store.blobs.path(w.digest).unlink()
        store.host.discard(w.digest)
        with pytest.raises(CorruptBlob, match="missing"):
            store.load(w)
        assert len(store.verify()) == 2


def test_startup_sweeps_temp_files_upload_dirs_and_orphans(tmp_path, spec, payloads):
    with DeltaStore.open(tmp_path, spec, LIMITS, store_settings()) as store:
        t, _ = store.tenants.create("t")
        kept = store.put(t, "qa", payloads[0])
        orphan = digest_bytes(b"orphan")
        store.blobs.put(orphan, b"orphan")
        dead_owner = store.scratch.owner
    dead = FORK.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    shard = tmp_path / "blobs" / kept.digest[:2]
    live = Scratch(tmp_path)  # another writer on this data dir, alive: its temp file stays
    stale_tmps = [shard / f".{kept.digest}.tmp-{dead.pid}-abcdef", shard / f".{kept.digest}.tmp-{dead_owner}-abcdef",
                  shard / f".{kept.digest}.tmp-{os.getpid()}-abcdef"]  # a pid is no proof of life (pid reuse)
    live_tmp = shard / f".{kept.digest}.tmp-{live.owner}-abcdef"
    for p in stale_tmps + [live_tmp]:
        p.write_bytes(b"half")
    (tmp_path / "tmp" / f"upload-{dead.pid}-abc123").mkdir()
    with DeltaStore.open(tmp_path, spec, LIMITS, store_settings(orphan_grace_s=3600)) as store:
        assert not any(p.exists() for p in stale_tmps) and live_tmp.exists()
        assert store.blobs.exists(orphan), "young orphan kept: its writer may be about to commit"
        assert list((tmp_path / "tmp").iterdir()) == []
    live_tmp.unlink()
    live.close()
    with DeltaStore.open(tmp_path, spec, LIMITS, store_settings(orphan_grace_s=0)) as store:
        assert not store.blobs.exists(orphan) and store.blobs.exists(kept.digest)
        check_consistent(store, t.id)


def _writer(data_dir, spec, tenant_id, payloads, log_path, seed):
    """Puts and deletes forever (until SIGKILL), logging each operation after it returns. Half the
    puts upload fresh bytes, so the kill often lands inside a blob write or before its row commits."""
    rng = random.Random(seed)
    store = DeltaStore.open(data_dir, spec, LIMITS, store_settings())
    scratch = log_path.parent / f"fresh-{seed}"
    scratch.mkdir(exist_ok=True)
    with open(log_path, "a") as log:
        for i in range(10 ** 9):
            payload = rng.choice(payloads)
            if rng.random() < 0.5:
                payload = scratch / f"{i}.safetensors"
                payload.write_bytes(dump_native(random_delta(spec, rank=4, seed=seed * 100_000 + i,
                                                             targets=("q_proj", "v_proj", "down_proj"))))
            name = f"d{rng.randrange(6)}"
            if rng.random() < 0.15:
                log.write(f"del {name}\n")  # intent first: the delete may commit before we log again
                log.flush()
                try:
                    store.delete(tenant_id, name)
                except Exception:  # NotFound: nothing to delete
                    pass
            else:
                v = store.put(tenant_id, name, payload)
                log.write(f"put {v.name} {v.version} {v.digest}\n")
                log.flush()


def test_sigkill_at_random_points_leaves_a_consistent_store(tmp_path, spec, payloads):
    data = tmp_path / "data"
    with DeltaStore.open(data, spec, LIMITS, store_settings()) as store:
        tenant_id = store.tenants.create("t")[0].id
    log_path = tmp_path / "ops.log"
    rng = random.Random(1234)
    total_puts = 0
    for round_ in range(14):
        child = FORK.Process(target=_writer, args=(data, spec, tenant_id, payloads, log_path, round_))
        child.start()
        time.sleep(rng.uniform(0.02, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        with DeltaStore.open(data, spec, LIMITS, store_settings(orphan_grace_s=0)) as store:
            check_consistent(store, tenant_id)
            # every put that returned (and was logged) survives unless a later delete was attempted
            expected: dict[tuple[str, int], str] = {}
            for line in log_path.read_text().splitlines():
                op, name, *rest = line.split()
                if op == "del":
                    expected = {k: d for k, d in expected.items() if k[0] != name}
                elif len(rest) == 2:
                    expected[(name, int(rest[0]))] = rest[1]
            for (name, version), digest in expected.items():
                assert store.resolve(tenant_id, f"{name}@{version}").digest == digest
            total_puts = sum(1 for line in log_path.read_text().splitlines() if line.startswith("put"))
    assert total_puts >= 14, "the kills landed before any real work; the test proved little"


def _proc_writer(data_dir, spec, tenant_id, payloads, prefix, n):
    store = DeltaStore.open(data_dir, spec, LIMITS, store_settings())
    for i in range(n):
        v = store.put(tenant_id, f"{prefix}-{i}", payloads[i % len(payloads)])
        assert store.load(store.resolve(tenant_id, v.ref)) is not None
    store.close()


def test_parallel_threads_and_processes_lose_nothing(tmp_path, spec, payloads):
    data = tmp_path / "data"
    with DeltaStore.open(data, spec, LIMITS, store_settings(host_cache_bytes=0)) as store:
        tenant_id = store.tenants.create("t")[0].id
        procs = [FORK.Process(target=_proc_writer, args=(data, spec, tenant_id, payloads, f"p{k}", 6))
                 for k in range(3)]
        for p in procs:
            p.start()
        errors = []

        def thread_writer(k):
            try:
                for i in range(6):
                    v = store.put(tenant_id, f"t{k}-{i}", payloads[(i + k) % len(payloads)])
                    assert store.load_key(v.key) is not None  # host tier off: every load reads disk
                    store.list(tenant_id)
            except Exception as exc:  # surfaced in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=thread_writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in procs:
            p.join()
        assert errors == [] and [p.exitcode for p in procs] == [0, 0, 0]
        listed = check_consistent(store, tenant_id)
        assert sorted(v.name for v in listed) == sorted([f"p{k}-{i}" for k in range(3) for i in range(6)] +
                                                        [f"t{k}-{i}" for k in range(3) for i in range(6)])
        assert store.stats().disk_loads >= 18
