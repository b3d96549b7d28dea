"""The async engine: streaming, abort and client cancellation free KV blocks at once and unpin the delta at the
next step, completion returns them too, overload refusal, graceful shutdown, stats listeners, a failing
delta load, and an idle engine that still installs a requested delta."""
from __future__ import annotations

import asyncio
import copy

import pytest

from delta_store.errors import FailedPrecondition, ResourceExhausted, Unavailable
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.stats import RequestStats, StepStats
from server.types import FinishReason, GenerationRequest, SamplingParams
from tests.helpers import tiny_llama
from tests.engine_helpers import FakeResidency

KEY = DeltaKey("t", "d", 1, "d")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=6)


def _engine(model, residency=None, **kw) -> Engine:
    values = dict(max_batch_tokens=64, max_running=8, kv_block_size=4, kv_blocks=64, max_model_len=128)
    values.update(kw)
    config = ServerConfig(**values)
    return Engine(config, ModelRunner(copy.deepcopy(model), None, config), residency)


def _req(rid: str, n_new: int = 8, delta=None, tenant: str = "a", prompt=(5, 6, 7, 8, 9, 10)) -> GenerationRequest:
    return GenerationRequest(rid, tenant, list(prompt), SamplingParams(max_new_tokens=n_new, temperature=0,
                                                                       ignore_eos=True), delta=delta)


def test_streams_equal_synchronous_steps(model):
    sync = _engine(model)
    for i in range(3):
        sync.add_request(_req(f"r{i}", 6 + i, prompt=range(3, 8 + 2 * i)))
    want = {}
    while sync.scheduler.has_work():
        for o in sync.step():
            want.setdefault(o.request_id, []).extend(o.token_ids)

    async def main():
        engine = _engine(model)
        await engine.start()
        assert engine.alive

        async def consume(req):
            outs = [o async for o in engine.generate(req)]
            assert outs[-1].finish_reason == FinishReason.LENGTH and all(o.finish_reason is None for o in outs[:-1])
            assert outs[-1].ttft is not None and outs[-1].queue_time is not None and outs[-1].total_time > 0
            return req.request_id, [t for o in outs for t in o.token_ids]
        got = dict(await asyncio.gather(*(consume(_req(f"r{i}", 6 + i, prompt=range(3, 8 + 2 * i)))
                                          for i in range(3))))
        await engine.shutdown(1.0)
        assert not engine.alive
        return got, engine
    got, engine = asyncio.run(main())
    assert got == want
    assert engine.runner.kv.allocator.num_used == 0


def test_abort_and_client_cancel_free_blocks_at_once_and_unpin(model):
    async def main():
        res = FakeResidency(capacity=2)
        engine = _engine(model, res)
        await engine.start()
        free0 = engine.runner.kv.allocator.num_free
        # abort by id after the first token
        stream = engine.generate(_req("abort-me", 100, KEY))
        first = await stream.__anext__()
        await asyncio.sleep(0.05)  # a few decode steps: the owner has seen the request running
        assert first.token_ids and engine.runner.kv.allocator.num_free < free0 and res.pinned == {KEY}
        assert engine.abort("abort-me")
        assert engine.runner.kv.allocator.num_free == free0  # at once, not next step
        assert engine.scheduler.running_deltas() == []  # nothing pins KEY at the owner's next step
        rest = [o async for o in stream]
        assert rest[-1].finish_reason == FinishReason.ABORTED
        assert not engine.abort("abort-me")
        # a client that goes away: the consuming task is cancelled mid-stream
        seen = asyncio.Event()

        async def client():
            async for _ in engine.generate(_req("gone", 100, KEY)):
                seen.set()
        task = asyncio.create_task(client())
        await seen.wait()
        assert engine.scheduler.running_deltas() == [KEY]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.runner.kv.allocator.num_free == free0 and engine.scheduler.running_deltas() == []
        assert not engine.scheduler.has_work()
        # completion returns everything too
        outs = [o async for o in engine.generate(_req("done", 5, KEY))]
        assert outs[-1].finish_reason == FinishReason.LENGTH
        engine.step()
        assert engine.runner.kv.allocator.num_free == free0 and res.pinned == set()
        await engine.shutdown(0)
    asyncio.run(main())


def test_idle_engine_installs_a_requested_delta(model):
    # PreloadDelta on an idle engine: the loop steps while the owner has a load pending, then sleeps again
    async def main():
        res = FakeResidency(capacity=2, load_steps=3)
        engine = _engine(model, res)
        await engine.start()
        res.request(KEY)
        engine.wake()
        for _ in range(200):
            if KEY in res.resident:
                break
            await asyncio.sleep(0.01)
        assert KEY in res.resident and not engine.scheduler.has_work()
        steps = res.steps
        await asyncio.sleep(0.05)
        assert res.steps == steps, "an idle engine with nothing pending does not spin"
        await engine.shutdown(0)
    asyncio.run(main())


def test_overload_refused_with_retry_hint(model):
    engine = _engine(model, max_waiting=2)
    engine.add_request(_req("a"))
    engine.add_request(_req("b"))
    with pytest.raises(ResourceExhausted, match="queue full") as err:
        engine.add_request(_req("c"))
    assert 0 < err.value.retry_after <= 30
    engine.step()  # both admitted: room again
    engine.add_request(_req("c"))
    with pytest.raises(FailedPrecondition, match="base model only"):
        engine.add_request(_req("d", delta=KEY))


def test_shutdown_lets_running_finish_then_refuses(model):
    async def main():
        engine = _engine(model)
        await engine.start()
        stream = engine.generate(_req("late", 6))
        task = asyncio.create_task(asyncio.sleep(0))
        await task
        shutdown = asyncio.create_task(engine.shutdown(30.0))
        outs = [o async for o in stream]
        await shutdown
        assert outs[-1].finish_reason == FinishReason.LENGTH  # finished inside the grace period
        with pytest.raises(Unavailable):
            engine.add_request(_req("new"))
        assert not engine.alive
    asyncio.run(main())


def test_stats_listeners_and_failed_delta_load(model):
    class Failing(FakeResidency):
        def lookup(self, key):
            if key.name == "broken":
                raise OSError("blob missing on disk")
            return super().lookup(key)

    res = Failing(capacity=2)
    engine = _engine(model, res)
    seen: list = []
    engine.add_listener(seen.append)
    engine.add_listener(lambda s: 1 / 0)  # a broken listener does not stop serving
    live_ok = engine.add_request(_req("ok", 3, KEY, tenant="a"))
    live_bad = engine.add_request(_req("bad", 3, DeltaKey("t", "broken", 1, "x"), tenant="b"))
    engine.add_request(_req("base", 3, tenant="c"))
    while engine.scheduler.has_work():
        engine.step()
    assert live_bad.outputs[-1].finish_reason == FinishReason.ERROR and "blob missing" in live_bad.outputs[-1].error
    assert live_ok.outputs[-1].finish_reason == FinishReason.LENGTH
    steps = [s for s in seen if isinstance(s, StepStats)]
    reqs = {s.request_id: s for s in seen if isinstance(s, RequestStats)}
    assert steps[0].num_seqs == 2 and steps[0].num_deltas == 1 and steps[0].prefill_tokens == 12
    assert steps[1].decode_tokens == 2 and steps[1].num_tokens == 2
    assert steps[-1].kv_blocks_used == 0 and steps[0].kv_blocks_total == 64
    assert reqs["ok"].completion_tokens == 3 and reqs["ok"].has_delta and reqs["ok"].ttft >= reqs["ok"].queue_time
    assert reqs["bad"].finish_reason == FinishReason.ERROR and reqs["base"].tpot is not None
    engine.step()
    assert res.pinned == set()


def test_loop_survives_a_failing_schedule(model):
    class Flaky(FakeResidency):
        fail = True

        def step(self, running=(), waiting=()):
            if self.fail:
                self.fail = False
                raise RuntimeError("device copy failed")
            return super().step(running, waiting)

    async def main():
        engine = _engine(model, Flaky(capacity=2))
        await engine.start()
        first = [o async for o in engine.generate(_req("a", 3))]
        assert first[-1].finish_reason == FinishReason.ERROR and "device copy failed" in first[-1].error
        second = [o async for o in engine.generate(_req("b", 3, KEY))]
        assert second[-1].finish_reason == FinishReason.LENGTH and engine.alive
        await engine.shutdown(0)
        assert engine.runner.kv.allocator.num_used == 0
    asyncio.run(main())
