"""Resource safety in the store (issue 15): quotas before any blob byte, archive expansion bounded by the
upload's own size, scratch files swept whatever their name (pid reuse included), a dead writer's orphan
blobs collected at once, version numbers never reused, real parameter counts, honest refusal messages.
The catalogue's part (quotas before the payload, versions never reused, revision 0002) runs on SQLite and on
PostgreSQL (``catalogue_target``, conftest.py)."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
import zipfile

import pytest
import torch

from delta_store import BaseSpec, DeltaStore
from delta_store.blobs import LocalBlobs
from delta_store.catalogue import Catalogue
from delta_store.errors import DeltaError, NotFound, ResourceExhausted
from delta_store.native import digest_bytes, dump_native
from delta_store.validate import Limits
from tests.helpers import random_delta, store_settings, tiny_llama

FORK = multiprocessing.get_context("fork")
LIMITS = Limits(max_rank=8)


@pytest.fixture(scope="module")
def spec():
    return BaseSpec.from_model(tiny_llama(seed=4))


@pytest.fixture
def native(spec, tmp_path):
    def make(seed: int = 0, rank: int = 4):
        f = tmp_path / f"n{seed}-{rank}.safetensors"
        f.write_bytes(dump_native(random_delta(spec, rank=rank, seed=seed)))
        return f
    return make


@pytest.fixture
def open_store(spec, catalogue_target):
    """``open_store(data_dir, blobs=None)``: a store whose catalogue is this test's ``catalogue_target``
    (a SQLite file or a PostgreSQL database), the same one each time it is called."""
    def make(data, blobs=None) -> DeltaStore:
        return DeltaStore.open(data, spec, LIMITS, store_settings(), catalogue=Catalogue(catalogue_target),
                               blobs=blobs)
    return make


def files_under(path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def scratch_left(store) -> list[str]:
    """Files under tmp/ (the live store's own lock and empty folder do not count)."""
    return [p for p in files_under(store.data_dir / "tmp")]


# ---- 2. quotas before any blob byte -------------------------------------------------------------
def test_quota_refusals_write_no_blob(tmp_path, native, open_store):
    with open_store(tmp_path / "data") as store:
        t, _ = store.tenants.create("t")
        size = store.put(t, "one", native(0)).size
        store.tenants.set_quotas(t.id, max_bytes=size + 10, max_deltas=5)
        for seed in range(1, 7):  # six different deltas, each over the byte quota
            with pytest.raises(ResourceExhausted, match="storage quota"):
                store.put(t, f"n{seed}", native(seed))
        store.tenants.set_quotas(t.id, max_bytes=1 << 30, max_deltas=1)
        with pytest.raises(ResourceExhausted, match="delta quota"):
            store.put(t, "two", native(9))
        assert set(store.blobs.iter()) == store.catalogue.referenced_digests() and len(set(store.blobs.iter())) == 1
        assert scratch_left(store) == []


def test_quota_check_is_available_before_the_payload(tmp_path, native, open_store):
    with open_store(tmp_path / "data") as store:
        t, _ = store.tenants.create("t")
        size = store.put(t, "one", native(0)).size
        store.tenants.set_quotas(t.id, max_deltas=1, max_bytes=size)
        with pytest.raises(ResourceExhausted, match="storage quota full"):  # any new version needs a byte
            store.check_quota(t, "one")
        store.tenants.set_quotas(t.id, max_bytes=size + 100)
        store.check_quota(t, "one")  # a new version of an existing name: within both quotas
        with pytest.raises(ResourceExhausted, match="delta quota"):
            store.check_quota(t, "two")
        with pytest.raises(ResourceExhausted, match="storage quota exceeded"):
            store.check_quota(t, "one", size=101)


def test_racing_uploads_past_a_shared_quota_one_wins_and_the_loser_leaves_no_blob(tmp_path, native, open_store):
    """Two stores on one catalogue (two replicas, or two processes on one host): both pass the check before
    the payload, the commit's check under the write lock refuses one, and its blob is removed."""
    shared = tmp_path / "shared"
    stores = [open_store(tmp_path / f"r{i}", blobs=LocalBlobs(shared)) for i in range(2)]
    try:
        t, _ = stores[0].tenants.create("t")
        size = stores[0].put(t, "seed", native(0)).size
        payloads = [native(1), native(2)]  # same size as the first: room for exactly one more
        stores[0].tenants.set_quotas(t.id, max_bytes=2 * size + size // 2)
        barrier, results = threading.Barrier(2), [None, None]
        real = [s.catalogue.add_version for s in stores]

        def racer(i):
            def add_version(*args, **kwargs):  # both have passed check_quota and written their blob by now
                barrier.wait(30)
                return real[i](*args, **kwargs)
            stores[i].catalogue.add_version = add_version
            try:
                results[i] = stores[i].put(t, f"n{i}", payloads[i])
            except ResourceExhausted as exc:
                results[i] = exc

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        won = [r for r in results if not isinstance(r, Exception)]
        lost = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(won) == 1 and len(lost) == 1 and "storage quota" in str(lost[0]), results
        assert set(LocalBlobs(shared).iter()) == stores[0].catalogue.referenced_digests(), "the loser's blob stayed"
        assert len(stores[0].catalogue.referenced_digests()) == 2
        for s in stores:
            assert scratch_left(s) == []
    finally:
        for s in stores:
            s.close()


# ---- 4. archive expansion bounded by the upload's size ------------------------------------------
def test_zip_bomb_writes_at_most_a_small_multiple_of_its_size(tmp_path, spec):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("adapter_config.json", b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
        zf.writestr("adapter_model.safetensors", b"\0" * (100 << 20))  # 100 MB of zeros: ~100 KB zipped
    size = bomb.stat().st_size
    settings = store_settings()
    assert size * settings.max_archive_ratio < (100 << 20) < settings.max_archive_bytes
    with DeltaStore.open(tmp_path / "d", spec, LIMITS, settings) as store:
        t, _ = store.tenants.create("t")
        peak, stop = [0], threading.Event()

        def watch():
            while not stop.is_set():
                total = 0
                # os.walk skips a folder removed under it (rglob raised, which ended this watcher
                # early and let the peak read low)
                for root, _dirs, files in os.walk(store.data_dir / "tmp"):
                    for name in files:
                        try:
                            total += os.stat(os.path.join(root, name)).st_size
                        except FileNotFoundError:
                            pass
                peak[0] = max(peak[0], total)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with pytest.raises(DeltaError, match="expand"):
                store.put(t, "bomb", bomb)
        finally:
            stop.set()
            watcher.join()
        assert peak[0] <= settings.max_archive_ratio * size + (1 << 20), f"{peak[0]} bytes written for a {size}-byte zip"
        assert scratch_left(store) == [] and list(store.blobs.iter()) == []


# ---- 3. every scratch file swept at start-up, whatever its name ---------------------------------
def _hold_store(data_dir, spec, ready, done):
    store = DeltaStore.open(data_dir, spec, LIMITS, store_settings())
    path = store.scratch.path("spool", ".payload")  # a live writer's scratch file, mid-upload
    path.write_bytes(b"half an upload")
    ready.set()
    done.wait(30)
    store.close()


def test_startup_sweeps_every_scratch_file_whatever_its_name(tmp_path, spec, native):
    data = tmp_path / "d"
    with DeltaStore.open(data, spec, LIMITS, store_settings()) as store:
        t, _ = store.tenants.create("t")
        kept = store.put(t, "qa", native(0))
    tmp, shard = data / "tmp", data / "blobs" / kept.digest[:2]
    leftovers = [tmp / "upload-7dtu59ha.payload", tmp / "upload-123-abcdef", tmp / "random name",
                 tmp / f"upload-{os.getpid()}-abc123", shard / f".{kept.digest}.tmp-{os.getpid()}-abcdef",
                 shard / "not-a-digest"]
    for p in leftovers:
        p.write_bytes(b"left behind")
    (tmp / "a-folder" / "deep").mkdir(parents=True)
    (tmp / "a-folder" / "deep" / "x.safetensors").write_bytes(b"x")
    # a live writer in another process keeps its scratch file
    ready, done = FORK.Event(), FORK.Event()
    child = FORK.Process(target=_hold_store, args=(data, spec, ready, done))
    child.start()
    try:
        assert ready.wait(30)
        with DeltaStore.open(data, spec, LIMITS, store_settings()) as store:
            assert [p for p in leftovers if p.exists()] == [], "start-up kept leftovers of dead writers"
            assert not (tmp / "a-folder").exists()
            live = [p for p in tmp.rglob("*") if p.is_file() and p.read_bytes() == b"half an upload"]
            assert len(live) == 1, "a live writer's scratch file was removed"
            assert store.blobs.exists(kept.digest)
    finally:
        done.set()
        child.join()
    with DeltaStore.open(data, spec, LIMITS, store_settings()) as store:
        assert scratch_left(store) == [], "the writer that exited left scratch files"


def _write_blob_and_die(data_dir, spec, payload):
    store = DeltaStore.open(data_dir, spec, LIMITS, store_settings())
    tenant = store.tenants.list()[0]

    def die(*args, **kwargs):
        os._exit(9)  # the process dies after the blob is durable and before its row commits

    store.catalogue.add_version = die
    store.put(tenant, "half", payload)


def test_a_dead_writers_uncommitted_blob_is_collected_at_start_up(tmp_path, spec, native):
    data = tmp_path / "d"
    with DeltaStore.open(data, spec, LIMITS, store_settings()) as store:
        store.tenants.create("t")
    child = FORK.Process(target=_write_blob_and_die, args=(data, spec, native(3)))
    child.start()
    child.join()
    assert child.exitcode == 9
    assert len(list((data / "blobs").rglob("*/*"))) == 1, "the blob was written before the kill"
    with DeltaStore.open(data, spec, LIMITS, store_settings(orphan_grace_s=3600)) as store:
        assert list(store.blobs.iter()) == [], "a dead writer's uncommitted blob waited for orphan_grace_s"
        assert scratch_left(store) == []


# ---- 6. version numbers are never reused -----------------------------------------------------------
def test_version_numbers_are_never_reused(tmp_path, native, open_store):
    data = tmp_path / "data"
    with open_store(data) as store:
        t, _ = store.tenants.create("t")
        v1 = store.put(t, "rep", native(0))
        store.delete(t, "rep")
        assert store.put(t, "rep", native(1)).version == 2
        store.delete(t, "rep@2")  # the last version, by number
    with open_store(data) as store:  # and across a restart
        assert store.put(t, "rep", native(2)).version == 3
        with pytest.raises(NotFound):
            store.resolve(t, "rep@1")
        assert store.resolve(t, "rep@3").digest != v1.digest
        # a deleted name holds no delta quota, and other names count from 1
        store.tenants.set_quotas(t.id, max_deltas=2)
        store.delete(t, "rep")
        assert store.put(t, "a", native(0)).version == 1 and store.put(t, "b", native(1)).version == 1


def test_a_revision_0001_catalogue_migrates_keeping_version_numbers(tmp_path, spec, native, open_store):
    """What a server before revision 0002 left (no high-water marks, no parameter counts) is migrated at
    open: live names keep counting from their last version, and the counts are filled from the blobs."""
    from alembic import command

    from delta_store.database import _alembic_config, write

    data = tmp_path / "data"
    with open_store(data) as store:
        t, _ = store.tenants.create("t")
        store.put(t, "kept", native(0))
        store.put(t, "kept", native(1))
        with write(store.catalogue.engine, "test") as conn:
            command.downgrade(_alembic_config(conn), "0001")
    with open_store(data) as store:
        assert store.catalogue.revision == "0002"
        assert [v.num_parameters for v in store.versions(t, "kept")] == [
            random_delta(spec, rank=4, seed=s).num_parameters() for s in (0, 1)]
        store.delete(t, "kept")
        assert store.put(t, "kept", native(2)).version == 3


# ---- 7. real parameter counts; honest messages ----------------------------------------------------
def test_num_parameters_is_stored_with_each_version(tmp_path, spec, native):
    with DeltaStore.open(tmp_path / "d", spec, LIMITS, store_settings()) as store:
        t, _ = store.tenants.create("t")
        v = store.put(t, "p", native(0, rank=3))
        expected = random_delta(spec, rank=3, seed=0).num_parameters()
        assert v.num_parameters == expected > 0
        assert store.resolve(t, "p").num_parameters == expected


def test_truncated_bin_is_reported_as_corrupt_not_as_an_unsafe_pickle(tmp_path, spec):
    good = {"model.layers.0.self_attn.v_proj.bias": torch.randn(spec.modules["model.layers.0.self_attn.v_proj"]
                                                               .out_features)}
    whole = tmp_path / "whole.bin"
    torch.save(good, whole)
    cut = tmp_path / "bias.bin"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.bin"
    torch.save({"x": Evil()}, evil)
    with DeltaStore.open(tmp_path / "d", spec, LIMITS, store_settings()) as store:
        t, _ = store.tenants.create("t")
        with pytest.raises(DeltaError) as info:
            store.put(t, "cut", cut)
        assert "weights-only" not in str(info.value) and "pickle" not in str(info.value)
        assert "truncated or corrupt" in str(info.value), str(info.value)
        with pytest.raises(DeltaError, match="unsafe pickle"):
            store.put(t, "evil", evil)
        assert list(store.blobs.iter()) == []


def test_payload_label_replaces_the_scratch_name_in_messages(tmp_path, spec):
    spooled = tmp_path / "upload-7dtu59ha.payload"
    spooled.write_bytes(b"\x01garbage" * 100)
    with DeltaStore.open(tmp_path / "d", spec, LIMITS, store_settings()) as store:
        t, _ = store.tenants.create("t")
        with pytest.raises(DeltaError) as info:
            store.put(t, "g", spooled, label="upload")
        assert "upload-7dtu59ha" not in str(info.value) and str(info.value).startswith("upload"), str(info.value)
