"""SIGKILL the server at random points of uploads (spool, extraction, conversion, blob write, commit), restart
it on the same data dir, and find ``tmp/`` empty, every blob referenced by a version, every acknowledged
upload intact (issue 15). A real server process and real uploads over gRPC, several rounds."""
from __future__ import annotations

import io
import random
import sqlite3
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from server.client import Client, upload_messages

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from load.server_proc import ServerProcess  # noqa: E402

ROUNDS = 4
UPLOADERS = 3
SETTINGS = {"grace_seconds": 1.0, "health_grace_seconds": 0.0, "max_uploads": 8, "max_uploads_per_tenant": 8}
RECIPES = ("lora_r64_all", "lora_r32_mlp", "ia3", "bottleneck_w64_gelu", "bitfit", "beft")  # load/payloads.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from server.demo import build_demo_model

    return str(build_demo_model(tmp_path_factory.mktemp("m") / "model", hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2))


@pytest.fixture(scope="module")
def payloads(model):
    """Distinct payloads (so most uploads write a new blob): PEFT tar archives, some gzipped, and native files."""
    import gzip

    from load.payloads import DeltaFactory

    factory = DeltaFactory(model)
    out = []
    for seed in range(36):
        p = factory.build(RECIPES[seed % len(RECIPES)], seed=seed)
        out.append(gzip.compress(p.data, compresslevel=1) if p.source_format == "peft" and seed % 2 else p.data)
    return out


def referenced(data: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{data / 'catalogue.sqlite3'}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT digest FROM versions")}
    finally:
        conn.close()


def blobs(data: Path) -> set[str]:
    return {p.name for p in (data / "blobs").glob("*/*") if p.is_file() and len(p.name) == 64}


def leftovers(data: Path) -> Counter:
    """What a killed server left, by kind (seen before the restart sweeps it)."""
    seen: Counter = Counter()
    for p in (data / "tmp").iterdir():
        kind = p.name.split(".", 1)[1].split("-", 1)[0] if "." in p.name else "other"
        seen[kind] += 1
    seen["blob_temp"] += sum(1 for p in (data / "blobs").glob("*/.*") if p.is_file())
    seen["orphan_blob"] += len(blobs(data) - referenced(data))
    return +seen


def uploader(client: Client, key: str, payloads, rng: random.Random, acked: dict, stop: threading.Event, k: int):
    c = client.with_key(key)
    n = 0
    while not stop.is_set():
        data = rng.choice(payloads)
        name = f"u{k}-{n % 4}"
        n += 1
        try:
            msgs = upload_messages(name, io.BytesIO(data), total_bytes=len(data), chunk_bytes=64 << 10)
            v = c.deltas.UploadDelta(msgs, metadata=c.metadata, timeout=30).version
            acked[(v.name, v.version)] = v.digest
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                acked[("error", n)] = f"{exc.code().name}: {exc.details()}"
            return


def check_restarted(data: Path, server: ServerProcess, key: str, acked: dict) -> None:
    tmp = [p.name for p in (data / "tmp").iterdir()]
    assert tmp == [], f"tmp/ after the restart: {tmp}"
    assert blobs(data) == referenced(data), "orphan or missing blobs after the restart"
    assert not [p for p in (data / "blobs").glob("*/.*")], "blob temp files survived the restart"
    errors = {k: v for k, v in acked.items() if k[0] == "error"}
    assert errors == {}, errors
    with Client(server.address, key) as c:
        stored = {(d.name, v.version): v.digest for d in c.list_deltas(timeout=30) for v in d.versions}
    lost = {k: v for k, v in acked.items() if stored.get(k) != v}
    assert lost == {}, f"acknowledged uploads lost or changed after the restart: {sorted(lost)[:5]}"


def test_sigkill_during_uploads_leaves_no_scratch_and_no_orphans(tmp_path, model, payloads):
    data = tmp_path / "data"
    rng = random.Random(15)
    server = ServerProcess(data, SETTINGS, model=model).start()
    with Client(server.address, server.admin_key) as admin:
        _, key = admin.create_tenant("uploader", quotas={"max_deltas": 1000, "max_delta_bytes": 1 << 40})
    acked: dict = {}
    seen: Counter = Counter()
    try:
        for round_ in range(ROUNDS):
            stop = threading.Event()
            with Client(server.address, key) as client:
                threads = [threading.Thread(target=uploader, args=(client, key, payloads, random.Random(rng.random()),
                                                                   acked, stop, k)) for k in range(UPLOADERS)]
                for t in threads:
                    t.start()
                time.sleep(rng.uniform(0.5, 2.5))
                server.proc.kill()
                server.proc.wait(30)
                stop.set()
                for t in threads:
                    t.join(60)
            server.stop()
            seen += leftovers(data)
            server = ServerProcess(data, SETTINGS, model=model).start()
            check_restarted(data, server, key, acked)
    finally:
        server.stop()
    assert len([k for k in acked if k[0] != "error"]) >= ROUNDS, f"too few uploads completed: {len(acked)}"
    assert sum(seen.values()) >= 2, f"the kills left almost nothing to sweep ({dict(seen)}): they landed between uploads"
    print(f"leftovers swept over {ROUNDS} kills: {dict(seen)}; acknowledged uploads kept: {len(acked)}")
