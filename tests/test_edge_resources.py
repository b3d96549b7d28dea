"""Resource safety at the gRPC edge: no tenant can stall, fill or confuse the server (issue 15).

One real server per module (tests/server_harness.py). Each test names the hole it closes:
a maximal prompt must not stall other tenants; refused uploads leave nothing on disk and are
refused before their payload is spooled when the header already decides; uploads are bounded in
number per tenant and per server; version numbers are never reused; the small promises (request
ids in the log, failed uploads logged, real parameter counts, no scratch names in refusals)."""
from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import generate_request
from server.pb import deltas_pb2
from tests.server_harness import (LogLines, Served, code_of, collect, finished_within, gen_request, held_upload,
                                  peft_lora, upload)

GRPC_MAX_MESSAGE = 8 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("server"))
    yield served
    served.close()


@pytest.fixture(scope="module")
def lora(srv):
    data, _merged = peft_lora(srv.model_dir, seed=11)
    return data


def blob_files(srv) -> set[str]:
    return {p.name for p in (Path(srv.app.config.data_dir) / "blobs").rglob("*") if p.is_file()}


def scratch_files(srv) -> list[Path]:
    """Files and folders under <data_dir>/tmp, the live server's own empty scratch folder aside."""
    tmp = Path(srv.app.config.data_dir) / "tmp"
    return [p for p in tmp.rglob("*") if not p.is_dir() or any(p.iterdir())]


# ---- 1. one large prompt must not stall every tenant -------------------------------------------
def test_maximal_prompts_are_refused_while_other_tenants_are_served(srv):
    big_md, small_md = srv.tenant("bigmouth"), srv.tenant("bystander")
    big = "a" * (GRPC_MAX_MESSAGE - (64 << 10))  # as long as a gRPC message can carry
    codes, details = [], []

    def send_big():
        for _ in range(3):
            try:
                list(srv.inference.Generate(generate_request(big, max_new_tokens=4), metadata=big_md, timeout=120))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                details.append(exc.details())

    senders = [threading.Thread(target=send_big) for _ in range(2)]
    for t in senders:
        t.start()
    health = health_pb2_grpc.HealthStub(srv.client.channel)
    probes, failures, worst = 0, [], 0.0
    while any(t.is_alive() for t in senders) or probes < 10:
        t0 = time.monotonic()
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)  # a liveness probe's deadline
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            tokens, _ = collect(srv.inference.Generate(gen_request(n=2), metadata=small_md, timeout=10.0))
            assert len(tokens) == 2
        except grpc.RpcError as exc:
            failures.append(f"{exc.code().name}: {exc.details()}")
        worst = max(worst, time.monotonic() - t0)
        probes += 1
        time.sleep(0.05)
    for t in senders:
        t.join()
    assert failures == [], f"{len(failures)} of {probes} probes failed while maximal prompts arrived: {failures[:3]}"
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6, codes
    assert all("bytes" in d for d in details), details[:1]
    assert worst < 5.0, f"a Health + small Generate probe took {worst:.1f} s"


def test_prompt_and_stop_limits_are_checked_before_any_work(srv):
    md = srv.tenant("counter")
    limit = srv.app.config.prompt_bytes_limit
    assert 0 < limit < GRPC_MAX_MESSAGE
    err = code_of(lambda: list(srv.inference.Generate(generate_request("é" * (limit // 2 + 1), max_new_tokens=2),
                                                      metadata=md)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{limit}" in err.details(), err.details()
    chat = [{"role": "user", "content": "a" * (limit // 2 + 1)}] * 2  # the bound is on the messages together
    err = code_of(lambda: list(srv.inference.Generate(generate_request(chat, max_new_tokens=2), metadata=md)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat messages" in err.details(), err.details()
    too_many = [5] * (srv.app.config.max_model_len + 1)
    err = code_of(lambda: list(srv.inference.Generate(generate_request(too_many, max_new_tokens=2), metadata=md)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in err.details()
    for sampling in ({"stop_strings": ["s"] * 17}, {"stop_strings": ["s" * 257]}, {"stop_token_ids": [7] * 257}):
        err = code_of(lambda: list(srv.inference.Generate(generate_request([5, 6], max_new_tokens=2, **sampling),
                                                          metadata=md)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop" in err.details(), err.details()
    tokens, _ = collect(srv.inference.Generate(generate_request("x" * 100, max_new_tokens=2, temperature=0.0,
                                                                ignore_eos=True, stop_strings=["s" * 256] * 16),
                                               metadata=md))
    assert len(tokens) == 2


# ---- 2. quotas before any blob byte; nothing on disk after a refusal ---------------------------
def test_uploads_refused_by_a_quota_leave_nothing_on_disk(srv, lora):
    md = srv.tenant("tight", max_delta_bytes=1000)  # the LoRA's native blob is tens of KB
    before = blob_files(srv)
    for i in range(6):
        err = code_of(lambda: upload(srv, md, f"big{i}", lora, total=len(lora)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "quota" in err.details()
    assert blob_files(srv) == before, "a refused upload left a blob behind"
    assert scratch_files(srv) == []


def test_a_tenant_at_its_quota_is_refused_before_its_payload_is_spooled(srv, lora):
    md = srv.tenant("full", max_deltas=1)
    upload(srv, md, "only", lora)
    future, release = held_upload(srv, md, "another", chunks=[b"\0" * 1024])
    try:
        assert finished_within(future, 5.0), "the server waited for the payload of an upload its quota refuses"
        assert future.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release()
    assert scratch_files(srv) == []


# ---- 4. concurrent uploads bounded per tenant and per server -----------------------------------
def test_concurrent_uploads_are_bounded_per_tenant_and_per_server(srv):
    cfg = srv.app.config
    held, refused = [], None
    md = srv.tenant("hoarder")
    try:
        for i in range(8):
            future, release = held_upload(srv, md, f"slow{i}", chunks=[b"x" * 100])
            held.append((future, release))  # a call whose future is collected is cancelled
            if finished_within(future, 1.0):
                refused = (i, future.exception())
                break
        assert refused is not None, "8 concurrent uploads of one tenant were all admitted"
        i, err = refused
        assert i == cfg.max_uploads_per_tenant and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert 1 <= int(dict(err.trailing_metadata())["retry-after-ms"]) <= 60_000
        # other tenants fill the server up to its own bound
        running, server_refusal = cfg.max_uploads_per_tenant, None
        for k in range(8):
            other = srv.tenant(f"crowd{k}")
            for j in range(cfg.max_uploads_per_tenant):
                future, release = held_upload(srv, other, f"slow{j}", chunks=[b"x" * 100])
                held.append((future, release))
                if finished_within(future, 1.0):
                    server_refusal = future.exception()
                    break
                running += 1
            if server_refusal is not None:
                break
        assert server_refusal is not None and running == cfg.max_uploads, (running, server_refusal)
        assert server_refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry-after-ms" in dict(server_refusal.trailing_metadata())
    finally:
        for _future, release in held:
            release()
    for future, _release in held:  # the admitted ones end now: 100 bytes of "x" are no delta
        assert future.exception(timeout=30).code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                       grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert srv.app.uploads.running() == 0
    assert scratch_files(srv) == [], "held uploads that ended without a payload left scratch files"


# ---- 6. name@N always means the same digest, or NOT_FOUND -------------------------------------
def test_version_numbers_are_never_reused_after_every_version_was_deleted(srv, lora):
    md = srv.tenant("pinner")
    other, _ = peft_lora(srv.model_dir, seed=12)
    first = upload(srv, md, "rep", lora)
    assert first.version == 1
    assert srv.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name="rep"), metadata=md).deleted_versions == 1
    again = upload(srv, md, "rep", other)
    assert again.version == 2, "a deleted name started again at @1: a client pinned to rep@1 gets other weights"
    err = code_of(lambda: list(srv.inference.Generate(gen_request("rep@1", n=2), metadata=md)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # deleting the only version by number, too
    assert srv.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name="rep@2"), metadata=md).deleted_versions == 1
    assert upload(srv, md, "rep", lora).version == 3


# ---- 7. the smaller promises -------------------------------------------------------------------
def test_labels_are_checked_before_the_payload_is_spooled(srv):
    md = srv.tenant("labeller")
    too_many = {f"k{i}": "v" for i in range(srv.app.store.settings.max_labels + 1)}
    for labels in (too_many, {"k" * 129: "v"}, {"k": "v" * 1025}, {"": "v"}):
        future, release = held_upload(srv, md, "labelled", chunks=[b"x" * 1024], labels=labels)
        try:
            assert finished_within(future, 5.0), "bad labels were checked only after the whole payload arrived"
            assert future.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            release()


def test_server_generated_request_id_is_logged(srv):
    md = srv.tenant("logged")
    with LogLines() as log:
        _, chunks = collect(srv.inference.Generate(gen_request(n=2), metadata=md))
        rid = chunks[-1].request_id
        assert rid
        deadline = time.monotonic() + 5
        while not log.events("generate") and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [f for f in log.events("generate") if f.get("tenant") == "logged"]
    assert [f["request_id"] for f in lines] == [rid], log.lines[-3:]


def test_failed_uploads_are_logged_at_info(srv):
    md = srv.tenant("failer")
    with LogLines() as log:
        err = code_of(lambda: upload(srv, md, "junk", b"not a delta at all" * 64))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        deadline = time.monotonic() + 5
        while not log.events("upload") and time.monotonic() < deadline:
            time.sleep(0.01)
    failed = [f for f in log.events("upload") if f.get("tenant") == "failer"]
    assert len(failed) == 1, log.lines[-3:]
    assert failed[0]["level"] == "info" and failed[0]["delta"] == "junk" and failed[0]["status"] == "invalid_argument"
    assert failed[0]["bytes"] == str(18 * 64) and "upload" in failed[0]["reason"], failed[0]


def test_num_parameters_is_the_deltas_real_parameter_count(srv, lora):
    md = srv.tenant("counted")
    version = upload(srv, md, "params", lora)
    with tarfile.open(fileobj=io.BytesIO(lora)) as tar:
        from safetensors.torch import load

        tensors = load(tar.extractfile("adapter_model.safetensors").read())
    assert version.num_parameters == sum(t.numel() for t in tensors.values()) > 0
    info = srv.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name="params"), metadata=md).delta
    assert info.versions[0].num_parameters == version.num_parameters


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_refusals_never_name_the_servers_scratch_files(srv):
    md = srv.tenant("nosy")
    data_dir = os.path.realpath(srv.app.config.data_dir)
    payloads = {
        "garbage": b"\x00\x01garbage" * 200,
        "bad_json": _tar_gz({"adapter_config.json": b"{not json", "adapter_model.safetensors": b"\0" * 64}),
        "bad_tensors": _zip({"adapter_config.json": b'{"peft_type": "LORA", "r": 4}',
                             "adapter_model.safetensors": b"\x10\0\0\0\0\0\0\0{}" + b"\0" * 64}),
        "torch_zip": _zip({"archive/data.pkl": b"\x80\x02}q\x00.", "archive/version": b"3\n"}),
        "empty_tar": _tar_gz({}),
    }
    for what, data in payloads.items():
        err = code_of(lambda: upload(srv, md, what, data))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.code(), err.details())
        details = err.details()
        for leak in ("upload-", ".payload", "/tmp", data_dir, "payload."):
            assert leak not in details, f"{what}: the refusal names a scratch file: {details!r}"
