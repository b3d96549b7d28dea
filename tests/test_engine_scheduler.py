"""Scheduler policy, pure Python: token budget, chunked prefill, KV admission and preemption, admission by
delta residency, tenant fairness (VTC) and the bounded queue. No model: each "step" runs the residency owner's
step, then marks the scheduled chunks as computed and, for chunks that reach the end, appends one output
token, as the engine would."""
from __future__ import annotations

import collections

import pytest

from delta_store.errors import InvalidArgument, ResourceExhausted
from delta_store.records import DeltaKey
from server.engine.block_pool import BlockPool
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SeqStatus
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import FakeResidency


def key(name: str) -> DeltaKey:
    return DeltaKey("t", name, 1, name)


def seq(rid: str, n_prompt: int, max_new: int = 8, tenant: str = "a", delta: DeltaKey | None = None) -> Sequence:
    req = GenerationRequest(rid, tenant, list(range(3, 3 + n_prompt)), SamplingParams(max_new_tokens=max_new),
                            delta=delta)
    return Sequence(req)


def make(blocks: int = 64, budget: int = 32, running: int = 8, waiting: int = 100, residency=None,
         block_size: int = 4, max_len: int = 256) -> Scheduler:
    cfg = SchedulerConfig(max_batch_tokens=budget, max_running=running, max_waiting=waiting, max_model_len=max_len,
                          block_size=block_size)
    return Scheduler(cfg, BlockPool(blocks), residency)


def run_step(s: Scheduler):
    """The residency owner's step, schedule, then play the engine: sampled chunks get a token; finished
    sequences leave."""
    if s.residency is not None:
        s.residency.step(s.running_deltas(), s.waiting_deltas())
    out = s.schedule()
    for c in out.chunks:
        if c.sample:
            c.seq.output_ids.append(7)
            if len(c.seq.output_ids) >= c.seq.sampling.max_new_tokens:
                s.finish(c.seq, "length")
    return out


def test_budget_decode_first_and_chunked_prefill():
    s = make(budget=10)
    s.add(seq("long", 25))
    out = run_step(s)
    assert [(c.seq.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [("long", 0, 10, False)]
    s.add(seq("short", 3))
    out = run_step(s)  # long continues (10 more), short gets nothing left
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("long", 10, 10)]
    out = run_step(s)  # long's last 5 tokens sampled; short's prompt fits after it
    assert [(c.seq.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [
        ("long", 20, 5, True), ("short", 0, 3, True)]
    out = run_step(s)  # both decode now: one token each, decode chunks first
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("long", 1), ("short", 1)]
    assert out.num_tokens <= 10


def test_kv_blocks_bound_admission_and_return_on_finish():
    s = make(blocks=6, block_size=4, budget=64)
    for i in range(4):
        s.add(seq(f"r{i}", 8, max_new=2))  # 8 tokens = 2 blocks each; 6 blocks fit 3 prompts
    out = run_step(s)
    assert len(out.chunks) == 3 and s.num_waiting == 1
    assert s.allocator.num_free == 0
    while s.has_work():
        run_step(s)
    assert s.allocator.num_free == 6 and s.num_running == 0 and s.waiting == {}


def test_preemption_by_recompute_when_blocks_run_out():
    s = make(blocks=4, block_size=4, budget=64, running=4)
    a, b = seq("a", 4, max_new=8), seq("b", 4, max_new=8)
    s.add(a)
    s.add(b)
    run_step(s)  # prefill: 1 full block each, first token sampled
    run_step(s)  # decoding position 4 grows each into a second block: 4 of 4 used
    assert s.allocator.num_free == 0
    for _ in range(3):
        run_step(s)  # positions 5..7 fill the second blocks
    out = run_step(s)  # position 8 needs a third block each: b (newest) is preempted for a
    assert [p.request_id for p in out.preempted] == ["b"]
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert b.num_preemptions == 1 and len(b.output_ids) == 5  # outputs kept, recomputed on re-admission
    while s.has_work():
        run_step(s)
    assert len(a.output_ids) == 8 and len(b.output_ids) == 8
    assert s.allocator.num_free == 4


def test_delta_not_resident_waits_while_others_run():
    res = FakeResidency(capacity=2, load_steps=3)
    s = make(residency=res)
    cold = seq("cold", 4, delta=key("x"))
    s.add(cold)
    s.add(seq("base", 4))
    out = run_step(s)
    assert [c.seq.request_id for c in out.chunks] == ["base"] and out.waiting_on_delta == 1
    steps = 1
    while cold.status is SeqStatus.WAITING:
        run_step(s)
        steps += 1
    # asked at the first lookup; installed by the owner's step load_steps + 1 later, admitted in that step
    assert steps == 1 + res.load_steps + 1 and cold.slot == 0
    assert (s.delta_admissions_resident, s.delta_admissions_waited) == (0, 1), "it waited: no device hit"
    warm, also_cold = seq("warm", 4, delta=key("x")), seq("late", 4, delta=key("y"))
    s.add(warm)
    s.add(also_cold)
    run_step(s)
    assert res.pinned == {key("x")}  # a running request pins its delta at the owner's next step
    assert warm.status is SeqStatus.RUNNING and not warm.waited_on_delta and also_cold.waited_on_delta
    assert (s.delta_admissions_resident, s.delta_admissions_waited) == (1, 1)
    while s.has_work():
        run_step(s)
    run_step(s)
    assert res.pinned == set() and not s.running_deltas()
    assert (s.delta_admissions_resident, s.delta_admissions_waited) == (1, 2)


def test_scheduler_only_asks_never_writes():
    # the scheduler looks deltas up; it never installs, evicts or pins (no such calls exist on the contract)
    res = FakeResidency(capacity=1)
    s = make(residency=res)
    s.add(seq("a", 4, delta=key("x")))
    s.schedule()
    assert res.lookups == 1 and res.steps == 0 and res.loading == {key("x"): 0} and not res.resident


def test_more_distinct_deltas_than_fit_all_complete():
    # 3 deltas fit, 8 are asked for: the running set's deltas are pinned; the others wait and get in as they go
    res = FakeResidency(capacity=3)
    s = make(residency=res, running=16, budget=64)
    seqs = [seq(f"r{i}", 2, max_new=3, delta=key(f"d{i}")) for i in range(8)]
    for q in seqs:
        s.add(q)
    seen_max = 0
    for _ in range(200):
        if not s.has_work():
            break
        out = run_step(s)
        seen_max = max(seen_max, len({c.seq.slot for c in out.chunks}))
        assert len(res.pinned) <= 3
    assert not s.has_work() and all(len(q.output_ids) == 3 for q in seqs)
    assert seen_max == 3


def test_fairness_one_tenant_flood_does_not_delay_another():
    """Tenant A queues 100 requests; B's single request, arriving later, gets its first token within a
    bounded number of steps: at most one of A's requests has to finish (max_new steps) plus one step.
    FIFO would make B wait for ~100 / max_running * max_new = 200 steps."""
    max_new, running = 16, 8
    s = make(blocks=1024, budget=64, running=running, waiting=200)
    for i in range(100):
        s.add(seq(f"a{i}", 8, max_new=max_new, tenant="A"))
    for _ in range(5):
        run_step(s)
    b = seq("b", 8, max_new=4, tenant="B")
    s.add(b)
    steps = 0
    while not b.output_ids:
        run_step(s)
        steps += 1
    bound = max_new + 1
    assert steps <= bound, f"B waited {steps} steps (bound {bound})"
    fifo_wait = (100 // running) * max_new
    assert steps * 10 < fifo_wait


def test_fair_share_between_two_backlogged_tenants():
    s = make(blocks=1024, budget=16, running=4, waiting=200)
    for i in range(40):
        s.add(seq(f"a{i}", 4, max_new=4, tenant="A"))
        s.add(seq(f"b{i}", 4, max_new=4, tenant="B"))
    served = collections.Counter()
    for _ in range(60):
        for c in run_step(s).chunks:
            served[c.seq.tenant] += c.num_tokens
    assert abs(served["A"] - served["B"]) <= 0.15 * (served["A"] + served["B"]), served


def test_overload_refused_with_retry_hint_and_impossible_requests():
    s = make(waiting=3, blocks=8, block_size=4, max_len=64)
    for i in range(3):
        s.add(seq(f"r{i}", 4))
    with pytest.raises(ResourceExhausted, match="queue full") as err:
        s.add(seq("r3", 4))
    assert err.value.retry_after and err.value.retry_after > 0
    with pytest.raises(InvalidArgument, match="KV blocks"):
        s.add(seq("huge", 30, max_new=20))  # 50 tokens need 13 blocks of 4, the cache has 8
    with pytest.raises(InvalidArgument, match="max_model_len"):
        s.add(seq("long", 64))


def test_finish_of_waiting_and_running_returns_everything():
    res = FakeResidency(capacity=2)
    s = make(residency=res, blocks=16)
    r, w = seq("r", 6, delta=key("x")), seq("w", 6)
    s.add(r)
    run_step(s)  # asks for x
    run_step(s)  # x installed and r admitted
    s.add(w)
    assert s.running_deltas() == [key("x")] and s.allocator.num_used == 2
    s.finish(r, "aborted")
    s.finish(w, "aborted")
    assert s.running_deltas() == [] and r.slot is None and s.allocator.num_used == 0 and not s.has_work()
    res.step(s.running_deltas(), s.waiting_deltas())
    assert res.pinned == set()  # nothing to release: the next owner step sees no running request on x
    s.finish(r, "aborted")  # idempotent


def test_chunks_grouped_by_slot_inside_decode_and_prefill_groups():
    res = FakeResidency(capacity=4)
    for i in range(3):
        res.request(key(f"d{i}"))
    res.step()  # resident before the requests come
    s = make(residency=res, budget=64, running=16)
    for i in range(8):
        s.add(seq(f"r{i}", 3, delta=key(f"d{i % 3}") if i % 4 else None))
    first = run_step(s)
    assert all(c.num_tokens == 3 for c in first.chunks)
    order = [c.seq.slot for c in first.chunks]
    assert order == sorted(order)
    s.add(seq("late", 5, delta=key("d1")))
    out = run_step(s)
    sizes = [c.num_tokens for c in out.chunks]
    assert sizes == sorted(sizes) and sizes[-1] == 5
    decode_slots = [c.seq.slot for c in out.chunks if c.num_tokens == 1]
    assert decode_slots == sorted(decode_slots) and len(set(decode_slots)) == 4


class _Prompt:  # the part of a PromptPart the scheduler reads
    def __init__(self, n: int, offset: int):
        self.num_virtual_tokens, self.position_offset = n, offset


def test_prompt_delta_admission_shares_the_prefix_and_counts_virtual_tokens():
    prompts = {0: _Prompt(6, 6)}
    res = FakeResidency(2, prompts=prompts.get)
    s = make(residency=res, max_len=32)
    a, b = seq("a", 5, max_new=4, delta=key("p")), seq("b", 3, max_new=4, delta=key("p"))
    s.add(a)
    s.add(b)
    res.request(key("p"))  # the engine's prefetch at add_request: the owner's next step installs it
    out = run_step(s)
    jobs, copies = s.prefix.take_jobs()
    assert len(jobs) == 1 and len(copies) == 2  # one prefix for both; each copies the 2-row tail into its block
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 6, 5), ("b", 6, 3)]
    assert a.block_table[0] == b.block_table[0] and a.num_tokens == 6 + 5 + 1
    assert s.allocator.refs(a.block_table[0]) == 3  # a, b and the pending job
    s.prefix.commit([a, b])
    long = seq("long", 20, max_new=8, delta=key("p"))  # 20 + 6 virtual + 8 new = 34 > 32
    s.add(long)
    out = run_step(s)
    assert out.failed and out.failed[0][0] is long and "6 virtual tokens" in str(out.failed[0][1])
    assert long.is_finished and s.running_deltas() == [key("p"), key("p")]  # a and b; long holds nothing
    small = make(blocks=5, residency=FakeResidency(2, prompts=prompts.get), max_len=32)
    small.residency.request(key("p"))
    wide = seq("wide", 10, max_new=8, delta=key("p"))  # 6 + 10 + 8 = 24 slots = 6 blocks of 4: never fits in 5
    small.add(wide)
    out = run_step(small)
    assert out.failed and "need 6 KV blocks, the cache has 5" in str(out.failed[0][1])
