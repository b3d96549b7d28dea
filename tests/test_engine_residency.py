"""The engine with the real residency owner and a delta budget smaller than the deltas in flight: every request
completes with the tokens it gets alone, and a running set whose deltas exactly fill the budget does not
deadlock the requests waiting behind it."""
from __future__ import annotations

import copy
import time

import pytest

from delta_store.base_spec import BaseSpec
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.deltas import wrap_model
from server.deltas.residency import Residency
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import run_engine
from tests.helpers import random_delta, tiny_llama

CONFIG = dict(max_batch_tokens=64, max_running=8, kv_block_size=4, kv_blocks=256, max_model_len=96)
RANKS = (4, 16, 8, 32, 4, 64, 16, 8)


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama(seed=9)
    spec = BaseSpec.from_model(base)
    deltas = {f"d{i}": random_delta(spec, rank=r, seed=50 + i, bias=i % 2 == 0,
                                    targets=("q_proj", "v_proj", "o_proj", "up_proj")[: 2 + i % 3])
              for i, r in enumerate(RANKS)}
    return base, deltas


def _engine(base, deltas, budget):
    config = ServerConfig(**CONFIG)
    dm = wrap_model(copy.deepcopy(base), max_slots=config.max_running, max_rank=64)
    res = Residency(dm, lambda key: deltas[key.name], budget)
    return Engine(config, ModelRunner(dm, None, config), res), res, dm


def _key(name: str) -> DeltaKey:
    return DeltaKey("t", name, 1, name)


def _req(i: int, name: str | None, n: int = 6) -> GenerationRequest:
    prompt = [3 + (7 * i + j) % 200 for j in range(5 + i % 7)]
    return GenerationRequest(f"r{i}", f"tenant{i % 3}", prompt, SamplingParams(max_new_tokens=n, temperature=0),
                             delta=None if name is None else _key(name))


def _alone(base, deltas, requests) -> dict[str, list[int]]:
    """Each request on its own, the budget roomy: the reference."""
    out = {}
    for req in requests:
        engine, res, _ = _engine(base, deltas, 64 << 20)
        out.update(run_engine(engine, [req]))
        res.close()
    return out


def test_more_distinct_deltas_in_flight_than_fit(setup):
    base, deltas = setup
    names = list(deltas)
    requests = [_req(i, names[i % len(names)] if i % 5 else None) for i in range(20)]
    want = _alone(base, deltas, requests)
    _, _, dm = _engine(base, deltas, 1 << 20)
    sizes = sorted(dm.footprint(d) for d in deltas.values())
    budget = sum(sizes[-3:]) + dm.slot_bytes * 16  # the three largest fit at once: 8 are asked for
    engine, res, _ = _engine(base, deltas, budget)
    got = run_engine(engine, requests, per_step=4)
    assert got == want
    st = res.stats()
    assert st.evictions > 0 and st.held_bytes <= budget and st.capacity_bytes <= budget
    res.close()


def test_running_deltas_exactly_filling_the_budget_do_not_deadlock(setup):
    base, deltas = setup
    first, rest = ["d1", "d3"], ["d7", "d0", "d2"]
    _, _, dm = _engine(base, deltas, 1 << 20)
    budget = sum(dm.footprint(deltas[n]) for n in first) + dm.slot_bytes * dm.next_slot_capacity(2)
    engine, res, served = _engine(base, deltas, budget)
    long_ones = [_req(i, n, n=24) for i, n in enumerate(first)]
    for r in long_ones:
        engine.add_request(r)
    deadline = time.monotonic() + 30
    while engine.scheduler.num_running < 2 and time.monotonic() < deadline:
        engine.step()  # loads run on worker threads; the owner installs them at a step
        time.sleep(0.005)
    assert engine.scheduler.num_running == 2  # both running: their deltas hold the whole budget
    assert res.stats().held_bytes + served.slot_bytes * served.slot_capacity == budget
    waiting = [_req(10 + i, n) for i, n in enumerate(rest)]
    for r in waiting:
        engine.add_request(r)
    tokens: dict[str, int] = {}
    finished: set[str] = set()
    deadline = time.monotonic() + 120
    while engine.scheduler.has_work():  # the waiting ones get in as the long ones finish; all of them end
        assert time.monotonic() < deadline, f"stalled: {sorted(finished)} finished"
        for o in engine.step():
            tokens[o.request_id] = tokens.get(o.request_id, 0) + len(o.token_ids)
            if o.finish_reason is not None:
                assert o.finish_reason == "length", o
                finished.add(o.request_id)
        time.sleep(0.002)
    assert finished == {r.request_id for r in long_ones + waiting}
    assert all(tokens[r.request_id] == r.sampling.max_new_tokens for r in waiting)
    engine.step()
    assert res.stats().pinned == 0 and engine.runner.kv.allocator.num_used == 0
    res.close()


def test_start_up_allocates_no_delta_memory(setup):
    base, deltas = setup
    engine, res, dm = _engine(base, deltas, 64 << 20)
    assert dm.capacity_bytes() == 0 and dm.slot_capacity == 0
    engine.step()
    assert res.stats().capacity_bytes == 0 and res.stats().resident == 0
    res.close()
