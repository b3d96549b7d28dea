"""Unit tests of the edge's pieces without a server: rate limits, key parsing, error mapping, pb conversion
and health."""
from __future__ import annotations

import grpc
import pytest

from delta_store.errors import (AlreadyExists, BaseMismatch, DeltaError, InvalidArgument, NotFound, PermissionDenied,
                                ResourceExhausted, Unauthenticated)
from server.edge.auth import bearer_key, rate_limits
from server.config import ServerConfig
from server.edge.errors import RETRY_AFTER_KEY, status_of
from server.edge.generation import sampling_params
from server.edge.grpc_inference import output_to_pb, sampling_fields
from server.models.generation import GenerationDefaults
from server.pb import common_pb2, inference_pb2
from server.edge.rate_limits import CONCURRENCY_RETRY_S, RateLimiter, RateLimits
from server.types import TokenOutput


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_request_bucket_refuses_with_a_retry_hint_then_refills():
    clock = Clock()
    q = RateLimiter(clock=clock)
    limits = RateLimits(requests_per_minute=2, tokens_per_minute=1000, max_concurrent=10)
    for _ in range(2):
        q.admit("t", limits, 10).release(10)
    with pytest.raises(ResourceExhausted, match="requests_per_minute=2") as info:
        q.admit("t", limits, 10)
    assert info.value.retry_after == pytest.approx(30.0)  # 2 per minute: one unit every 30 s
    clock.now += 30.0
    q.admit("t", limits, 10).release()
    q.admit("other", limits, 10).release()  # tenants do not share buckets


def test_token_bucket_charges_max_and_refunds_unused_tokens():
    clock = Clock()
    q = RateLimiter(clock=clock)
    limits = RateLimits(requests_per_minute=100, tokens_per_minute=100, max_concurrent=10)
    lease = q.admit("t", limits, 80)
    with pytest.raises(ResourceExhausted, match="tokens_per_minute=100") as info:
        q.admit("t", limits, 30)
    assert info.value.retry_after == pytest.approx(6.0)  # 10 missing tokens at 100/60 per second
    lease.release(used_tokens=20)  # 60 of the 80 charged come back
    q.admit("t", limits, 70).release()
    with pytest.raises(ResourceExhausted, match="more than tokens_per_minute") as info:
        q.admit("t", limits, 101)
    assert info.value.retry_after is None  # waiting would never help


def test_concurrency_cap_and_idempotent_release():
    q = RateLimiter(clock=Clock())
    limits = RateLimits(requests_per_minute=100, tokens_per_minute=10_000, max_concurrent=2)
    a, b = q.admit("t", limits, 1), q.admit("t", limits, 1)
    with pytest.raises(ResourceExhausted, match="max_concurrent=2") as info:
        q.admit("t", limits, 1)
    assert info.value.retry_after == CONCURRENCY_RETRY_S
    a.release()
    a.release()  # twice: still one unit back, not two
    assert q.running("t") == 1
    with q.admit("t", limits, 1):
        assert q.running("t") == 2
    b.release()
    assert q.running("t") == 0


def test_changed_limits_take_effect_and_keep_running_count():
    q = RateLimiter(clock=Clock())
    lease = q.admit("t", RateLimits(1, 100, 5), 1)
    with pytest.raises(ResourceExhausted):
        q.admit("t", RateLimits(1, 100, 5), 1)
    q.admit("t", RateLimits(10, 100, 5), 1).release()  # new quotas: fresh buckets
    with pytest.raises(ResourceExhausted, match="max_concurrent"):
        q.admit("t", RateLimits(10, 100, 1), 1)  # the running request still counts
    lease.release()


@pytest.mark.parametrize("metadata, ok", [
    ([("authorization", "Bearer ds_abc")], True),
    ([("authorization", "bearer   ds_abc  ")], True),
    ([("Authorization", b"Bearer ds_abc")], True),
    ([], False),
    ([("authorization", "Basic ds_abc")], False),
    ([("authorization", "Bearer")], False),
    ([("authorization", "Bearer " + "x" * 300)], False),
])
def test_bearer_key_parsing(metadata, ok):
    if ok:
        assert bearer_key(metadata) == "ds_abc"
    else:
        with pytest.raises(Unauthenticated):
            bearer_key(metadata)


def test_rate_limits_fall_back_to_config_defaults():
    class Q:
        requests_per_minute, tokens_per_minute, max_concurrent = 5, None, 2

    class T:
        quotas = Q()

    cfg = ServerConfig(default_tokens_per_minute=1234)
    assert rate_limits(T(), cfg) == RateLimits(5, 1234, 2)


@pytest.mark.parametrize("exc, code", [
    (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT), (DeltaError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("delta 'a' not found"), grpc.StatusCode.NOT_FOUND), (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED), (BaseMismatch("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS), (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL),
])
def test_status_mapping(exc, code):
    got, details, trailing = status_of(exc)
    assert got == code
    assert "secret" not in details and "\n" not in details
    assert trailing == ()


def test_resource_exhausted_carries_retry_after_ms():
    code, details, trailing = status_of(ResourceExhausted("slow down\nsecond line", retry_after=1.5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == "slow down"
    assert trailing == ((RETRY_AFTER_KEY, "1500"),)
    assert status_of(ResourceExhausted("queue full"))[2] == ()  # no hint when none is known


def sampling_from_pb(msg, defaults=None, chat=False, stops=()):
    return sampling_params(sampling_fields(msg), defaults, chat=chat, extra_stop_ids=stops)


def test_sampling_defaults_and_validation():
    s = sampling_from_pb(inference_pb2.SamplingParams())
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (64, 1.0, 1.0, 0, None)
    s = sampling_from_pb(inference_pb2.SamplingParams(temperature=0.0, seed=7, max_new_tokens=3, stop_strings=["\n"]))
    assert s.greedy and s.seed == 7 and s.max_new_tokens == 3 and s.stop_strings == ["\n"]
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(repetition_penalty=0.0), dict(max_new_tokens=1 << 17)):
        with pytest.raises(InvalidArgument, match="sampling"):
            sampling_from_pb(inference_pb2.SamplingParams(**bad))


def test_unset_sampling_fields_take_the_models_generation_config():
    model = GenerationDefaults.from_dict({"do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": 20,
                                          "max_new_tokens": 100})
    s = sampling_from_pb(inference_pb2.SamplingParams(), model)
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.repetition_penalty) == (0.2, 0.9, 20, 100, 1.0)
    # what the request sets wins, including an explicit 0 (greedy, top_k off)
    s = sampling_from_pb(inference_pb2.SamplingParams(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=5), model)
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens) == (0.0, 0, 1.0, 5)
    greedy = GenerationDefaults.from_dict({"do_sample": False})
    assert sampling_from_pb(inference_pb2.SamplingParams(), greedy).greedy


def test_chat_prompts_get_a_longer_default_and_the_end_of_turn_stop():
    s = sampling_from_pb(inference_pb2.SamplingParams(stop_token_ids=[9]), None, chat=True, stops=[2, 9])
    assert s.max_new_tokens == 512 and s.stop_token_ids == [9, 2]


def test_output_to_pb_sets_timings_only_on_the_last_chunk():
    mid = output_to_pb(TokenOutput("r", [5, 6], "ab", prompt_tokens=3, completion_tokens=2), 2)
    assert mid.finish_reason == common_pb2.FINISH_REASON_NONE and not mid.HasField("timings")
    assert (mid.usage.total_tokens, mid.delta_version, list(mid.token_ids)) == (5, 2, [5, 6])
    last = output_to_pb(TokenOutput("r", [7], "c", finish_reason="eos", prompt_tokens=3, completion_tokens=3,
                                    queue_time=0.1, ttft=0.2, total_time=0.5), 2)
    assert last.finish_reason == common_pb2.FINISH_REASON_EOS and last.timings.total_seconds == 0.5


def test_health_follows_the_engine_and_turns_not_serving_on_drain():
    import asyncio

    from grpc_health.v1 import health_pb2

    from server.edge.grpc_server import SERVICES, HealthReporter

    class FakeApp:
        alive = False

        def ready(self):
            return self.alive

    async def scenario():
        app = FakeApp()
        reporter = HealthReporter(app)

        async def status(service=""):
            reply = await reporter.servicer.Check(health_pb2.HealthCheckRequest(service=service), None)
            return reply.status

        await reporter.update()
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING  # model not loaded / loop not alive
        app.alive = True
        await reporter.start()
        for service in ("",) + SERVICES:
            assert await status(service) == health_pb2.HealthCheckResponse.SERVING
        app.alive = False  # the engine loop died: the watcher notices within HEALTH_POLL_S
        await asyncio.sleep(0.7)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        app.alive = True
        await reporter.update()
        await reporter.drain()
        assert await status(SERVICES[0]) == health_pb2.HealthCheckResponse.NOT_SERVING

    asyncio.run(scenario())
