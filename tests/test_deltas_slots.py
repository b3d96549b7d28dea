"""Device slots: background loads, LRU among unpinned slots, pins never evicted, replaced versions
never served stale, load errors surfaced once, stats. A fake DeltaModel records the pool writes;
one test runs the real store and the real DeltaModel."""
from __future__ import annotations

import copy
import random
import threading
import time

import pytest
import torch

from delta_store.delta import Delta, ModuleDelta
from delta_store.errors import DeltaError, InvalidArgument, NotFound
from delta_store.records import DeltaKey
from server.deltas.slots import SlotManager


class FakeDM:
    def __init__(self, num_slots):
        self.pools = [None] * num_slots
        self.calls = []

    def check(self, delta):
        if delta.description == "too-big":
            raise DeltaError("m: LoRA rank 99 exceeds the pool's max_rank 8")

    def set_delta(self, slot, delta, *, checked=False):
        if not checked:
            self.check(delta)
        self.calls.append(("set", slot, delta.description))
        self.pools[slot] = delta.description

    def clear(self, slot):
        self.calls.append(("clear", slot))
        self.pools[slot] = None

    def prompt_of(self, slot):
        return None  # these deltas have no prompt part


def key(name, version=1):
    return DeltaKey("t", name, version, f"{name}-{version}-digest")


class Loader:
    """Loads a Delta whose description names the key; can block (gate) and fail on demand."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.fail: dict[str, Exception] = {}
        self.count = 0

    def __call__(self, k):
        self.gate.wait(5)
        self.count += 1
        if k.name in self.fail:
            raise self.fail[k.name]
        return Delta({"m": ModuleDelta(bias=torch.zeros(2))},
                     description="too-big" if k.name == "big" else f"{k.name}@{k.version}")


def settle(slots, timeout=5.0):
    deadline = time.monotonic() + timeout
    while slots.stats().loading and time.monotonic() < deadline:
        time.sleep(0.002)
    assert slots.stats().loading == 0, "loads did not finish"


def make(num_slots=2):
    dm, loader = FakeDM(num_slots), Loader()
    return SlotManager(dm, loader, num_slots), dm, loader


def get(slots, k):
    """acquire until resident (what the scheduler does across steps)."""
    for _ in range(3):
        slot = slots.acquire(k)
        if slot is not None:
            return slot
        settle(slots)
        slots.install_ready()
    raise AssertionError(f"{k} never became resident")


def test_miss_loads_in_background_then_hits():
    slots, dm, loader = make()
    loader.gate.clear()
    a = key("a")
    assert slots.acquire(a) is None and slots.acquire(a) is None, "loading: the scheduler runs others"
    assert slots.stats().loading == 1 and slots.stats().misses == 1, "one load however often it is asked"
    loader.gate.set()
    settle(slots)
    assert slots.stats().ready == 1 and dm.pools == [None, None], "nothing touches the pools off the step loop"
    assert slots.install_ready() == 1 and dm.pools[0] == "a@1"
    s0 = slots.acquire(a)
    s1 = slots.acquire(a)
    assert s0 == s1 == 0
    st = slots.stats()
    assert (st.hits, st.misses, st.loads, st.slots_in_use, st.pinned, st.evictions) == (2, 1, 1, 1, 1, 0)
    assert st.load_seconds > 0
    slots.release(s0)
    slots.release(s1)
    assert slots.stats().pinned == 0
    with pytest.raises(InvalidArgument, match="not pinned"):
        slots.release(s0)
    slots.close()


def test_lru_eviction_among_unpinned_slots():
    slots, dm, _ = make(2)
    a, b, c = key("a"), key("b"), key("c")
    for k in (a, b):
        slots.release(get(slots, k))
    slots.release(slots.acquire(a))  # a is now more recent than b
    slot_b = slots.slot_of(b)
    slots.release(get(slots, c))
    assert slots.slot_of(b) is None and slots.slot_of(c) == slot_b, "b was least recently used"
    assert sorted(p for p in dm.pools) == ["a@1", "c@1"]
    assert slots.stats().evictions == 1
    slots.close()


def test_pinned_slots_are_never_evicted_and_no_free_slot_is_none():
    slots, dm, _ = make(2)
    a, b, c = key("a"), key("b"), key("c")
    sa, sb = get(slots, a), get(slots, b)
    assert slots.acquire(c) is None
    settle(slots)
    assert slots.install_ready() == 0 and slots.acquire(c) is None, "every slot pinned: wait"
    assert dm.pools[sa] == "a@1" and dm.pools[sb] == "b@1"
    assert slots.stats().ready == 1
    slots.release(sb)
    assert slots.acquire(c) == sb and dm.pools[sb] == "c@1", "the ready load takes the freed slot"
    assert dm.pools[sa] == "a@1"
    slots.close()


def test_eviction_under_pressure_never_touches_a_pinned_slot():
    slots, dm, _ = make(3)
    rng = random.Random(0)
    held: list[tuple[int, DeltaKey]] = []
    for _ in range(400):
        if held and (len(held) >= 3 or rng.random() < 0.45):
            slot, k = held.pop(rng.randrange(len(held)))
            assert dm.pools[slot] == f"{k.name}@1", "a pinned slot's weights changed under its request"
            slots.release(slot)
            continue
        k = key(f"d{min(int(rng.paretovariate(1.2)), 9)}")
        slot = slots.acquire(k)
        if slot is None:
            settle(slots)
            slots.install_ready()
            slot = slots.acquire(k)
        if slot is not None:
            assert dm.pools[slot] == f"{k.name}@1"
            held.append((slot, k))
    st = slots.stats()
    assert st.evictions > 10 and st.hits > 50
    assert st.slots_in_use <= 3 and st.pinned == len({s for s, _ in held})
    slots.close()


def test_a_replaced_version_is_a_new_key_and_old_requests_keep_old_weights():
    slots, dm, _ = make(2)
    v1, v2 = key("qa", 1), key("qa", 2)
    old = get(slots, v1)  # a running request on version 1
    new = get(slots, v2)  # the tenant uploads version 2; a new request resolves to it
    assert old != new and dm.pools[old] == "qa@1" and dm.pools[new] == "qa@2"
    slots.release(new)
    assert slots.acquire(v1) == old and dm.pools[old] == "qa@1"
    slots.release(old)
    slots.release(old)
    slots.invalidate(v1)  # the old version is deleted: dropped at once when unpinned
    assert dm.pools[old] is None and slots.slot_of(v1) is None
    slots.close()


def test_invalidate_while_pinned_frees_on_last_release():
    slots, dm, loader = make(2)
    a = key("a")
    s = get(slots, a)
    slots.invalidate(a)
    assert dm.pools[s] == "a@1", "the running request keeps its weights"
    loader.fail["a"] = NotFound("delta a@1 not found (deleted or replaced)")
    assert slots.acquire(a) is None, "new requests do not get the doomed slot"
    slots.release(s)
    assert dm.pools[s] is None
    settle(slots)
    with pytest.raises(NotFound):
        slots.acquire(a)
    slots.close()


def test_load_and_install_errors_are_raised_once():
    slots, dm, loader = make(2)
    loader.fail["bad"] = DeltaError("blob is corrupt")
    bad = key("bad")
    assert slots.acquire(bad) is None
    settle(slots)
    with pytest.raises(DeltaError, match="corrupt"):
        slots.acquire(bad)
    assert slots.acquire(bad) is None, "raised once; asking again starts a new load"
    big = key("big")
    assert slots.acquire(big) is None
    settle(slots)
    slots.install_ready()
    with pytest.raises(DeltaError, match="max_rank"):
        slots.acquire(big)
    assert dm.pools == [None, None] and slots.stats().load_errors >= 2
    slots.close()


def test_real_store_and_delta_model_replacement_while_pinned(tmp_path):
    from delta_store import BaseSpec, DeltaStore
    from delta_store.native import dump_native
    from delta_store.validate import Limits
    from server.deltas import wrap_model
    from tests.helpers import random_delta, store_settings, tiny_llama

    base = tiny_llama(seed=2)
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
        slots = SlotManager(dm, store.load_key, num_slots=2)

        def logits(slot):
            dm.batch.prepare_sequences([slot], [ids.shape[1]])
            with torch.no_grad():
                return dm.model(input_ids=ids).logits

        old = get(slots, versions[0].key)
        before = logits(old)
        new = get(slots, store.resolve(tenant, "qa").key)
        assert new != old
        assert torch.equal(logits(old), before), "the old request still runs on version 1"
        assert (logits(new) - before).abs().max() > 1e-3, "new requests get version 2"
        slots.release(old)
        store.delete(tenant, "qa@1")
        slots.invalidate(versions[0].key)
        assert slots.acquire(versions[0].key) is None
        settle(slots)
        with pytest.raises(NotFound):
            slots.acquire(versions[0].key)
        slots.close()
