"""The residency owner (server/deltas/residency.py): background loads and prefetch, installs only in step(), LRU
eviction by bytes among unpinned deltas, pins derived from the running set, no starvation and no deadlock when
pinned deltas fill the budget, replaced and deleted versions, load errors raised for one step. A fake DeltaModel
records what would be written; the last tests run the real store and the real DeltaModel."""
from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from delta_store.delta import Delta, ModuleDelta
from delta_store.errors import DeltaError, NotFound
from delta_store.records import DeltaKey
from server.deltas.model import StagedDelta
from server.deltas.residency import Residency


class FakeDM:
    """Footprints from the delta's description ("name:bytes"); install / clear recorded; slot tables free."""

    slot_bytes = 0

    def __init__(self):
        self.slots: dict[int, str] = {}
        self.calls: list = []
        self.slot_capacity = 0
        self.threads: set[str] = set()

    def next_slot_capacity(self, n):
        return max(n, self.slot_capacity)

    def stage(self, delta, *, checked=False, pin=False):
        if delta.description.startswith("bad"):
            raise DeltaError("m: LoRA rank 99 exceeds the server's max_rank 8")
        size = int(delta.description.split(":")[1])
        return StagedDelta({"name": delta.description}, size, size)

    def ensure_slots(self, n):
        self.slot_capacity = max(self.slot_capacity, n)

    def install(self, items, room):
        self.threads.add(threading.current_thread().name)
        for slot, staged in items:
            self.calls.append(("install", slot, staged.modules["name"]))
            self.slots[slot] = staged.modules["name"].split(":")[0]
        return 0

    def clear(self, slot):
        self.calls.append(("clear", slot))
        self.slots.pop(slot, None)

    def compact(self):
        return 0

    def capacity_bytes(self):
        return 0


def key(name, version=1):
    return DeltaKey("t", name, version, f"{name}-{version}-digest")


class Loader:
    """A Delta whose description is "name:bytes" (sizes[name], default 100); gate blocks, fail raises."""

    def __init__(self, sizes=None):
        self.sizes = sizes or {}
        self.gate = threading.Event()
        self.gate.set()
        self.fail: dict[str, Exception] = {}
        self.count = 0

    def __call__(self, k):
        self.gate.wait(5)
        self.count += 1
        if k.name in self.fail:
            raise self.fail[k.name]
        return Delta({"m": ModuleDelta(bias=torch.zeros(2))}, description=f"{k.name}:{self.sizes.get(k.name, 100)}")


def settle(res, timeout=5.0):
    deadline = time.monotonic() + timeout
    while (res.stats().loading or res.stats().queued) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert res.stats().loading == 0, "loads did not finish"


def make(budget=250, sizes=None):
    dm, loader = FakeDM(), Loader(sizes)
    return Residency(dm, loader, budget), dm, loader


def resident(res, k, running=()):
    """Ask, let the load finish, step: what a waiting request sees over a few steps."""
    for _ in range(3):
        slot = res.lookup(k)
        if slot is not None:
            return slot
        settle(res)
        res.step(running, [k])
    raise AssertionError(f"{k} never became resident")


def test_a_miss_loads_in_the_background_and_only_step_installs():
    res, dm, loader = make()
    loader.gate.clear()
    a = key("a")
    assert res.lookup(a) is None and res.lookup(a) is None, "loading: the scheduler admits others"
    assert res.stats().loading == 1 and res.stats().misses == 1, "one load however often it is asked"
    loader.gate.set()
    settle(res)
    assert res.stats().ready == 1 and dm.calls == [], "nothing is written off the step loop"
    assert res.lookup(a) is None, "ready is not resident: the install is the step's"
    assert res.step([], [a]) == 1 and dm.slots == {0: "a"}
    assert res.lookup(a) == res.lookup(a) == 0
    st = res.stats()
    assert (st.hits, st.misses, st.loads, st.resident, st.held_bytes, st.real_bytes) == (2, 1, 1, 1, 100, 100)
    assert st.load_seconds > 0 and res.busy() is False
    res.close()


def test_requests_prefetch_and_notify():
    res, dm, loader = make()
    fut = res.request(key("p"), notify=True)
    assert not fut.done() and res.busy()
    settle(res)
    res.step()
    assert fut.result(timeout=1) == 0 and dm.slots == {0: "p"}
    assert res.request(key("p"), notify=True).result(timeout=0) == 0, "already resident: done at once"
    res.close()


def test_lru_eviction_by_bytes_among_unpinned():
    res, dm, _ = make(budget=250, sizes={"a": 100, "b": 100, "c": 150})
    sa, sb = resident(res, key("a")), resident(res, key("b"))
    res.lookup(key("a"))  # a is now more recent than b
    sc = resident(res, key("c"))  # 100 + 100 + 150 > 250: b (least recently used) goes
    assert res.slot_of(key("b")) is None and res.slot_of(key("a")) == sa and sc == sb
    assert sorted(dm.slots.values()) == ["a", "c"] and res.stats().evictions == 1
    assert res.stats().held_bytes == 250
    res.close()


def test_pinned_deltas_are_never_evicted_and_a_waiting_delta_blocks_new_pins():
    res, dm, _ = make(budget=200)
    a, b, c = key("a"), key("b"), key("c")
    resident(res, a)
    resident(res, b)
    res.lookup(c)
    settle(res)
    res.step(running=[a], waiting=[c])  # a pinned, b unpinned: b goes for c
    assert res.slot_of(b) is None and res.slot_of(c) is not None and res.slot_of(a) is not None
    d = key("d")
    res.lookup(d)
    settle(res)
    res.step(running=[a, c], waiting=[d])  # both resident deltas run: d must wait
    st = res.stats()
    assert st.ready == 1 and st.blocked == 1 and sorted(dm.slots.values()) == ["a", "c"]
    res.request(b)
    settle(res)
    res.step(running=[a, c], waiting=[d, b])
    assert res.lookup(b) is None and res.lookup(a) is not None, "while d waits, nothing new gets pinned"
    res.step(running=[a], waiting=[d])  # c finished: its memory goes to d, the first waiting delta
    assert res.slot_of(d) is not None and res.slot_of(c) is None and res.stats().blocked == 0
    res.close()


def test_running_set_exactly_filling_the_budget_does_not_deadlock():
    # two running deltas hold the whole budget; three more wait; every request finishes in turn
    res, dm, _ = make(budget=200)
    queue = [key(n) for n in "abcde"]
    running: dict[DeltaKey, int] = {}  # key -> steps left
    done = []
    for _ in range(200):
        if not queue and not running:
            break
        res.step(list(running), queue)
        for k in list(queue):
            if len(running) < 4 and res.lookup(k) is not None:
                queue.remove(k)
                running[k] = 3
        for k in list(running):
            running[k] -= 1
            if running[k] == 0:
                del running[k]
                done.append(k.name)
        settle(res)
    assert sorted(done) == list("abcde") and res.stats().held_bytes <= 200
    res.close()


def test_a_replaced_version_is_a_new_key_and_old_requests_keep_old_weights():
    res, dm, _ = make()
    v1, v2 = key("qa", 1), key("qa", 2)
    old = resident(res, v1)
    new = resident(res, v2, running=[v1])
    assert old != new and dm.slots[old] == "qa" and dm.slots[new] == "qa"
    res.invalidate(v1)  # deleted while a request runs on it
    res.step(running=[v1])
    assert old in dm.slots and res.lookup(v1) is None, "running keeps it; nobody new gets it"
    res.step(running=[])
    assert old not in dm.slots and res.stats().resident == 1
    res.close()


def test_invalidate_drops_queued_loading_and_ready():
    res, dm, loader = make()
    loader.gate.clear()
    a = key("a")
    fut = res.request(a, notify=True)
    res.invalidate(a)
    loader.gate.set()
    settle(res)
    res.step()
    assert dm.calls == [] and fut.cancelled()
    res.close()


def test_load_errors_reach_the_next_step_then_are_forgotten():
    res, dm, loader = make()
    loader.fail["gone"] = NotFound("delta gone@1 not found (deleted or replaced)")
    gone = key("gone")
    assert res.lookup(gone) is None
    settle(res)
    res.step([], [gone])
    with pytest.raises(NotFound):
        res.lookup(gone)
    with pytest.raises(NotFound):
        res.lookup(gone)  # every request waiting on it during that step fails
    res.step()
    del loader.fail["gone"]
    assert res.lookup(gone) is None, "forgotten: a later request loads afresh"
    settle(res)
    res.step()
    assert res.lookup(gone) is not None and res.stats().load_errors == 1
    res.lookup(key("bad"))  # a delta the model refuses (validation on the load thread)
    settle(res)
    res.step()
    with pytest.raises(DeltaError, match="max_rank"):
        res.lookup(key("bad"))
    assert dm.calls == [("install", 0, "gone:100")]
    res.close()


def test_a_delta_larger_than_the_budget_fails_its_requests():
    res, dm, _ = make(budget=50, sizes={"big": 80})
    res.lookup(key("big"))
    settle(res)
    res.step()
    with pytest.raises(Exception, match="more than delta_memory_bytes=50"):
        res.lookup(key("big"))
    res.close()


# ---- the real store and DeltaModel --------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_llama():
    from tests.helpers import tiny_llama

    return tiny_llama(seed=2, hidden=256, layers=2)


def _lora_delta(spec, rank, seed, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    from tests.helpers import random_delta

    return random_delta(spec, rank=rank, seed=seed, targets=targets)


def test_bytes_per_resident_delta_within_1_25x_and_nothing_before(wide_llama, tmp_path):
    from delta_store import BaseSpec
    from server.deltas import wrap_model

    dm = wrap_model(copy.deepcopy(wide_llama), max_slots=8, max_rank=256)
    spec = BaseSpec.from_model(wide_llama)
    deltas = {f"r{r}-{i}": _lora_delta(spec, r, seed=10 * r + i) for i, r in enumerate([4, 8, 16, 32, 64] * 3)}
    res = Residency(dm, lambda k: deltas[k.name], budget_bytes=64 << 20)
    assert dm.capacity_bytes() == 0 and res.stats().capacity_bytes == 0, "start-up holds no per-delta memory"
    for name in deltas:
        res.request(key(name))
    settle(res)
    res.step()
    assert res.stats().resident == len(deltas)
    for name, delta in deltas.items():
        real, foot = dm.real_bytes(delta), dm.footprint(delta)
        assert foot <= 1.25 * real, (name, foot / real)
    cells = sum(a.held_bytes for layer in dm.layers.values() for a in layer.rows.arenas.values())
    assert cells <= 1.25 * sum(dm.real_bytes(d) for d in deltas.values())
    st = res.stats()
    assert st.held_bytes <= 1.25 * st.real_bytes and st.capacity_bytes <= st.budget_bytes
    res.close()


def test_real_store_and_model_replacement_while_running(wide_llama, tmp_path):
    from delta_store import BaseSpec, DeltaStore
    from delta_store.native import dump_native
    from delta_store.validate import Limits
    from server.deltas import wrap_model
    from tests.helpers import random_delta, store_settings

    base = wide_llama
    spec = BaseSpec.from_model(base)
    dm = wrap_model(copy.deepcopy(base), max_slots=2, max_rank=8, max_bottleneck=8)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with DeltaStore.open(tmp_path, spec, Limits(max_rank=8), store_settings()) as store:
        tenant, _ = store.tenants.create("t")
        versions = []
        for seed in (1, 2):
            f = tmp_path / f"v{seed}.safetensors"
            f.write_bytes(dump_native(random_delta(spec, rank=4, seed=seed, bias=True)))
            versions.append(store.put(tenant, "qa", f))
        res = Residency(dm, store.load_key, budget_bytes=16 << 20)

        def logits(slot):
            dm.batch.prepare_sequences([slot], [ids.shape[1]])
            with torch.no_grad():
                return dm.model(input_ids=ids).logits

        old = resident(res, versions[0].key)
        before = logits(old)
        new = resident(res, store.resolve(tenant, "qa").key, running=[versions[0].key])
        assert new != old
        assert torch.equal(logits(old), before), "the old request still runs on version 1"
        assert (logits(new) - before).abs().max() > 1e-3, "new requests get version 2"
        store.delete(tenant, "qa@1")
        res.invalidate(versions[0].key)
        res.step(running=[])
        assert res.lookup(versions[0].key) is None
        settle(res)
        res.step([], [versions[0].key])
        with pytest.raises(NotFound):
            res.lookup(versions[0].key)
        res.close()
