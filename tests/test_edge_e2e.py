"""The gRPC edge end to end: one real server per module on 127.0.0.1:0 (engine loop on its own thread),
a tiny demo-shaped Llama, a tmp data dir, real uploads of PEFT LoRAs and a real Prometheus scrape."""
from __future__ import annotations

import io
import os
import re
import time
import urllib.request

import grpc
import pytest

from server.client import DELTA_HEADER, REPLICA_HEADER, upload_messages
from server.pb import common_pb2, deltas_pb2, inference_pb2, tenants_pb2
from tests.server_harness import (MAX_UPLOAD, PROMPT, Served, auth, code_of, collect, gen_request, greedy, peft_lora,
                                  upload)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("server"))
    yield served
    served.close()


@pytest.fixture(scope="module")
def alice(srv):
    md = srv.tenant("alice")
    data, merged = peft_lora(srv.model_dir, seed=1)
    version = upload(srv, md, "style", data, total=len(data))
    return md, version, merged


# ---- standard services -------------------------------------------------------------------------
def test_health_serving_and_reflection_lists_services(srv):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(srv.client.channel)
    for service in ("", "deltaserve.v1.Inference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    refl = reflection_pb2_grpc.ServerReflectionStub(srv.client.channel)
    replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"deltaserve.v1.Inference", "deltaserve.v1.Deltas", "deltaserve.v1.Tenants",
            "grpc.health.v1.Health"} <= names, names


# ---- generation parity -------------------------------------------------------------------------
def test_uploaded_peft_lora_streams_the_merged_models_tokens(srv, alice):
    md, version, merged = alice
    assert (version.name, version.version) == ("style", 1)
    assert version.kinds == [common_pb2.DELTA_KIND_LORA] and version.max_rank == 4 and len(version.digest) == 64
    tokens, chunks = collect(srv.inference.Generate(gen_request("style", n=12), metadata=md))
    assert tokens == greedy(merged, PROMPT, 12)
    assert len(chunks) >= 2, "expected a stream of chunks, got one message"
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.delta_version == 1
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 12)
    assert last.timings.total_seconds >= last.timings.ttft_seconds > 0
    assert all(c.finish_reason == common_pb2.FINISH_REASON_NONE for c in chunks[:-1])
    # the base model alone differs from the delta (the delta is not a no-op)
    base_tokens, _ = collect(srv.inference.Generate(gen_request("", n=12), metadata=md))
    assert base_tokens != tokens


def test_text_prompt_and_logprobs(srv, alice):
    md, _, _ = alice
    req = inference_pb2.GenerateRequest(text="hello world", delta="style@1", sampling=inference_pb2.SamplingParams(
        max_new_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True))
    tokens, chunks = collect(srv.inference.Generate(req, metadata=md))
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(tokens) == 4 and len(logprobs) == 4 and all(lp <= 0 for lp in logprobs)


# ---- tenancy -----------------------------------------------------------------------------------
def test_other_tenants_delta_is_not_found_everywhere(srv, alice):
    bob = srv.tenant("bob")
    assert list(srv.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(), metadata=bob).deltas) == []
    calls = {
        "get": lambda: srv.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name="style"), metadata=bob),
        "generate": lambda: list(srv.inference.Generate(gen_request("style"), metadata=bob)),
        "delete": lambda: srv.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name="style"), metadata=bob),
        "preload": lambda: srv.deltas.PreloadDelta(deltas_pb2.PreloadDeltaRequest(delta="style"), metadata=bob),
    }
    for what, call in calls.items():
        err = code_of(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, (what, err.code(), err.details())
        assert "alice" not in err.details()
    missing = code_of(lambda: srv.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name="nothing"), metadata=bob))
    assert missing.details().replace("nothing", "style") == code_of(calls["get"]).details()  # same shape: no oracle
    # alice still sees hers, with usage counted from the earlier generations
    info = srv.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name="style"), metadata=alice[0]).delta
    assert [v.version for v in info.versions] == [1] and info.usage.requests >= 1
    listed = srv.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(page_size=10), metadata=alice[0])
    assert [d.name for d in listed.deltas] == ["style"]


def test_missing_or_bad_key_is_unauthenticated_and_tenants_needs_admin(srv, alice):
    for md in ([], auth("ds_not-a-real-key"), [("authorization", "Basic abc")]):
        err = code_of(lambda: srv.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(), metadata=md))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, md
        err = code_of(lambda: list(srv.inference.Generate(gen_request(), metadata=md)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = code_of(lambda: srv.tenants.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=alice[0]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    names = [t.name for t in srv.tenants.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=auth(srv.admin_key)).tenants]
    assert {"admin", "alice"} <= set(names)


def test_rotate_key_revokes_the_old_one(srv):
    md = srv.tenant("carol")
    new = srv.tenants.RotateKey(tenants_pb2.RotateKeyRequest(name="carol"), metadata=auth(srv.admin_key)).api_key
    err = code_of(lambda: srv.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(), metadata=md))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert srv.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(), metadata=auth(new)).deltas == []
    srv.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name="carol"), metadata=auth(srv.admin_key))
    err = code_of(lambda: srv.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(), metadata=auth(new)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = code_of(lambda: srv.tenants.CreateTenant(tenants_pb2.CreateTenantRequest(name="alice"),
                                                   metadata=auth(srv.admin_key)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = code_of(lambda: srv.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name="admin"),
                                                   metadata=auth(srv.admin_key)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- uploads -----------------------------------------------------------------------------------
def test_bad_uploads_are_invalid_argument_and_store_nothing(srv, alice):
    md = srv.tenant("dave")
    good, _ = peft_lora(srv.model_dir, seed=2)
    cases = {
        "oversize": (bytes(MAX_UPLOAD + 1), None),
        "oversize_announced": (good, MAX_UPLOAD + 1),
        "truncated": (good[: len(good) // 2], len(good)),
        "truncated_archive": (good[: len(good) // 2], None),
        "malformed": (b"this is not a delta file" * 100, None),
    }
    for what, (data, total) in cases.items():
        err = code_of(lambda: upload(srv, md, what, data, total=total))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.code(), err.details())
    assert list(srv.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(), metadata=md).deltas) == []
    spool = srv.app.config.data_dir + "/tmp"
    assert not [f for f in os.listdir(spool) if f.startswith("upload-") and f.endswith(".payload")]
    no_header = code_of(lambda: srv.deltas.UploadDelta(iter([deltas_pb2.UploadDeltaRequest(chunk=b"x")]), metadata=md))
    assert no_header.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_delta_count_quota_and_rate_and_concurrency_limits(srv):
    data, _ = peft_lora(srv.model_dir, seed=3)
    small = srv.tenant("erin", max_deltas=1)
    upload(srv, small, "one", data)
    upload(srv, small, "one", data)  # a new version of the same name does not count as a new delta
    err = code_of(lambda: upload(srv, small, "two", data))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()

    ratey = srv.tenant("frank", requests_per_minute=2)
    for _ in range(2):
        collect(srv.inference.Generate(gen_request(n=2), metadata=ratey))
    err = code_of(lambda: list(srv.inference.Generate(gen_request(n=2), metadata=ratey)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = dict(err.trailing_metadata() or ())
    assert 1000 <= int(retry["retry-after-ms"]) <= 60_000, retry  # 1 request per 30 s refills in ~30 s
    updated = srv.tenants.SetQuotas(tenants_pb2.SetQuotasRequest(
        name="frank", quotas=common_pb2.Quotas(requests_per_minute=100)), metadata=auth(srv.admin_key)).tenant
    assert updated.quotas.requests_per_minute == 100 and updated.quotas.max_concurrent == 32  # others kept
    collect(srv.inference.Generate(gen_request(n=2), metadata=ratey))  # the new quota applies at once

    single = srv.tenant("gina", max_concurrent=1)
    first = srv.inference.Generate(gen_request(n=300), metadata=single)
    next(first)  # admitted and streaming
    err = code_of(lambda: list(srv.inference.Generate(gen_request(n=2), metadata=single)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent" in err.details()
    first.cancel()
    srv.idle()


# ---- deadlines and cancellation ----------------------------------------------------------------
def test_short_deadline_is_deadline_exceeded_and_frees_the_request(srv, alice):
    """The server ends such calls itself and counts them as deadlines, several at once too (the client's own
    deadline fires first under load when the server waits for it: those were counted 'cancelled')."""
    md, _, _ = alice
    before = {s: srv.requests_counted("alice", s) for s in ("deadline_exceeded", "cancelled")}
    calls = [srv.inference.Generate(gen_request("style", n=400), metadata=md, timeout=0.3) for _ in range(4)]
    for call in calls:
        err = code_of(lambda: list(call))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    srv.idle()
    deadline = time.monotonic() + 5  # the handler counts the call in its finally, after the status went out
    while srv.requests_counted("alice", "deadline_exceeded") < before["deadline_exceeded"] + 4 and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.requests_counted("alice", "deadline_exceeded") == before["deadline_exceeded"] + 4
    assert srv.requests_counted("alice", "cancelled") == before["cancelled"]


def test_cancel_mid_stream_frees_kv_blocks_and_delta_pin(srv, alice):
    md, _, _ = alice
    engine, residency = srv.app.engine, srv.app.residency
    call = srv.inference.Generate(gen_request("style", n=400), metadata=md)
    next(call)
    next(call)
    assert engine.runner.kv.allocator.num_used > 0 and residency.stats().pinned == 1
    call.cancel()
    srv.idle()  # raises if the KV blocks or the delta pin are still held


# ---- hot swap ----------------------------------------------------------------------------------
def test_hot_swap_old_stream_finishes_on_old_weights(srv):
    md = srv.tenant("hank")
    v1_data, v1_model = peft_lora(srv.model_dir, seed=4)
    v2_data, v2_model = peft_lora(srv.model_dir, seed=5)
    assert upload(srv, md, "swap", v1_data).version == 1
    old = srv.inference.Generate(gen_request("swap", n=300), metadata=md)
    first = next(old)
    assert upload(srv, md, "swap", v2_data).version == 2
    assert srv.app.engine.scheduler.num_running >= 1, "the old request finished before the new version landed"
    new_tokens, new_chunks = collect(srv.inference.Generate(gen_request("swap", n=10), metadata=md))
    assert new_chunks[-1].delta_version == 2
    assert new_tokens == greedy(v2_model, PROMPT, 10)
    rest = list(old)
    old_tokens = list(first.token_ids) + [t for c in rest for t in c.token_ids]
    assert rest[-1].delta_version == 1 and len(old_tokens) == 300
    assert old_tokens[:20] == greedy(v1_model, PROMPT, 20)
    assert new_tokens != old_tokens[:10]
    srv.idle()


def test_preload_and_delete(srv, alice):
    md = srv.tenant("ivy")
    data, _ = peft_lora(srv.model_dir, seed=6)
    upload(srv, md, "warm", data)
    upload(srv, md, "warm", data)
    reply = srv.deltas.PreloadDelta(deltas_pb2.PreloadDeltaRequest(delta="warm@1"), metadata=md)
    assert reply.version.version == 1 and reply.tier == deltas_pb2.CACHE_TIER_DEVICE
    assert srv.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name="warm@1"), metadata=md).deleted_versions == 1
    assert srv.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name="warm"), metadata=md).deleted_versions == 1
    err = code_of(lambda: list(srv.inference.Generate(gen_request("warm"), metadata=md)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_preload_to_device_while_the_engine_is_busy(srv, alice):
    md, _, _ = alice
    other = srv.tenant("jill")
    data, _ = peft_lora(srv.model_dir, seed=8)
    upload(srv, other, "busy", data)
    call = srv.inference.Generate(gen_request("style", n=300), metadata=md)
    next(call)
    reply = srv.deltas.PreloadDelta(deltas_pb2.PreloadDeltaRequest(delta="busy", tier=deltas_pb2.CACHE_TIER_DEVICE),
                                    metadata=other)
    assert reply.tier == deltas_pb2.CACHE_TIER_DEVICE, "installed between forwards of the running request"
    assert srv.app.engine.scheduler.num_running >= 1, "the running request finished before the preload answered"
    key = srv.app.store.resolve(srv.app.store.tenants.get_by_name("jill"), "busy").key
    assert srv.app.residency.slot_of(key) is not None
    call.cancel()
    srv.idle()


def test_a_delta_larger_than_the_whole_budget_is_refused_at_upload(srv):
    from delta_store.native import dump_native
    from tests.helpers import random_delta

    md = srv.tenant("kim")
    spec = srv.app.engine.runner.dm.spec
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    big = random_delta(spec, rank=16, targets=targets, seed=3)
    assert srv.app.engine.runner.dm.footprint(big) > srv.app.budgets.delta_bytes
    err = code_of(lambda: upload(srv, md, "huge", dump_native(big)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    msg = err.details()
    assert re.search(r"model\.layers\.\d\.mlp\.\w+_proj: LoRA rank 16 ", msg), msg
    assert f"delta_memory_bytes={srv.app.budgets.delta_bytes}" in msg, msg
    assert not srv.app.store.list(srv.app.store.tenants.get_by_name("kim"))[0], "nothing stored"


def test_bad_requests_are_invalid_argument(srv, alice):
    md, _, _ = alice
    bad = [
        inference_pb2.GenerateRequest(sampling=inference_pb2.SamplingParams(max_new_tokens=2)),  # no prompt
        inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[10_000])),
        gen_request(n=2, top_p=0.0),
        gen_request(n=2, top_p=1.5),
        gen_request("bad/name"),
        gen_request(n=600),  # prompt + max_new_tokens > max_model_len
    ]
    for req in bad:
        err = code_of(lambda: list(srv.inference.Generate(req, metadata=md)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, err.details())


# ---- routing metadata ------------------------------------------------------------------------------
def test_routing_header_must_agree_with_the_body_and_every_reply_names_the_replica(srv, alice):
    md, _version, _merged = alice
    call = srv.client.with_key(md[0][1].split()[1]).generate(PROMPT, delta="style", max_new_tokens=2, temperature=0.0)
    assert len(list(call)) >= 1
    assert dict(call.initial_metadata())[REPLICA_HEADER] == srv.app.replica_id != ""
    for header in ([], [(DELTA_HEADER, "style")]):  # the header is optional; when sent it must match
        assert collect(srv.inference.Generate(gen_request("style", n=2), metadata=md + header))[0]
    for header, request in (([(DELTA_HEADER, "other")], gen_request("style", n=2)),
                            ([(DELTA_HEADER, "style@1")], gen_request("style", n=2)),
                            ([(DELTA_HEADER, "style")], gen_request("", n=2)),
                            ([(DELTA_HEADER, "style"), (DELTA_HEADER, "other")], gen_request("style", n=2))):
        err = code_of(lambda: list(srv.inference.Generate(request, metadata=md + header)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and DELTA_HEADER in err.details(), err.details()
    err = code_of(lambda: srv.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name="style"),
                                                 metadata=md + [(DELTA_HEADER, "styl")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    data, _ = peft_lora(srv.model_dir, seed=9)
    with pytest.raises(grpc.RpcError) as info:
        srv.deltas.UploadDelta(upload_messages("fresh", io.BytesIO(data)), metadata=md + [(DELTA_HEADER, "style")])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply, call = srv.deltas.GetDelta.with_call(deltas_pb2.GetDeltaRequest(name="style"), metadata=md)
    assert dict(call.initial_metadata())[REPLICA_HEADER] == srv.app.replica_id and reply.delta.name == "style"
    err = code_of(lambda: srv.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name="nope"), metadata=md))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # errors carry the replica too: sent before the handler runs
    assert dict(err.initial_metadata())[REPLICA_HEADER] == srv.app.replica_id


# ---- metrics (last: it reads what the traffic above produced) ----------------------------------
def test_zz_metrics_scrape_after_traffic(srv, alice):
    collect(srv.inference.Generate(gen_request("style", n=4), metadata=alice[0]))
    srv.idle()
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)

    def total(prefix: str) -> float:
        return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))

    for series in ("deltaserve_requests_total", "deltaserve_request_latency_seconds_count",
                   "deltaserve_time_to_first_token_seconds_count", "deltaserve_time_per_output_token_seconds_count",
                   "deltaserve_queue_wait_seconds_count", "deltaserve_generated_tokens_total",
                   "deltaserve_batch_size_count", "deltaserve_step_duration_seconds_count",
                   "deltaserve_delta_cache_hits_total", "deltaserve_delta_cache_misses_total",
                   "deltaserve_delta_loads_total", "deltaserve_rpcs_total", "deltaserve_delta_admissions_total"):
        assert total(series) > 0, f"{series} is zero or missing"
    assert samples['deltaserve_requests_total{status="ok",tenant="alice"}'] >= 2
    assert any(k.startswith('deltaserve_requests_total{status="resource_exhausted"') for k in samples)
    assert any(k.startswith('deltaserve_requests_total{status="deadline_exceeded"') for k in samples)
    assert samples['deltaserve_requests_by_delta_kind_total{kind="lora"}'] >= 1
    assert samples["deltaserve_kv_blocks_total"] > 0
    assert samples['deltaserve_delta_device_memory_bytes{state="budget"}'] == srv.app.budgets.delta_bytes
    assert 0 < samples['deltaserve_delta_device_memory_bytes{state="held"}'] <= samples[
        'deltaserve_delta_device_memory_bytes{state="capacity"}'] <= srv.app.budgets.delta_bytes
    assert samples['deltaserve_delta_resident{tier="device"}'] >= 1
    assert samples['deltaserve_delta_bytes_budget{tier="device"}'] == srv.app.budgets.delta_bytes
    # the router view (vLLM names): queue, batch and KV gauges, and the resident deltas as its one info series
    assert samples["vllm:num_requests_waiting"] == 0 and samples["vllm:num_requests_running"] == 0
    assert 0 <= samples["vllm:kv_cache_usage_perc"] <= 1
    (info,) = [k for k in samples if k.startswith("vllm:lora_requests_info{")]
    resident = re.search(r'running_lora_adapters="([^"]*)"', info).group(1).split(",")
    # max_lora: the most distinct deltas one step serves (max_running); residency itself is by bytes
    assert "style@1" in resident and f'max_lora="{srv.app.config.max_running}"' in info
    text = "\n".join(line for line in text.splitlines() if not line.startswith("vllm:lora_requests_info"))
    labels = set(re.findall(r'="([^"]*)"', text))
    for forbidden in ("style", "swap", "warm", "one", "two"):
        assert forbidden not in labels, f"label value {forbidden!r} is a delta name"
    assert not any(re.fullmatch(r"[0-9a-f]{64}", v) for v in labels), "a label carries a digest"
