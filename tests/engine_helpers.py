"""Engine test helpers: a fake residency owner with observable pins, and a synchronous driver of Engine.step."""
from __future__ import annotations

import collections
import time

from delta_store.records import DeltaKey
from server.engine import Engine
from server.types import GenerationRequest


class FakeResidency:
    """The residency contract (lookup / request / step / busy) with observable state, for engine and scheduler
    tests: ``capacity`` deltas fit the device; a requested delta is installed by the ``load_steps + 1``-th
    ``step()`` after it was asked for (0: the next one), into a free slot or over the least recently used
    unpinned one; pins are the running deltas given to the last ``step()``. ``install(slot, key)`` lets
    engine tests copy a real delta into the model when a load lands."""

    def __init__(self, capacity: int, load_steps: int = 0, install=None):
        self.capacity = capacity
        self.load_steps = load_steps
        self.install = install
        self.resident: collections.OrderedDict[DeltaKey, int] = collections.OrderedDict()  # LRU order
        self.pinned: set[DeltaKey] = set()
        self.loading: dict[DeltaKey, int] = {}  # key -> step() calls left
        self.lookups = self.steps = 0

    def lookup(self, key: DeltaKey) -> int | None:
        self.lookups += 1
        slot = self.resident.get(key)
        if slot is not None:
            self.resident.move_to_end(key)
            return slot
        self.request(key)
        return None

    def request(self, key: DeltaKey, **_kw) -> None:
        if key not in self.resident and key not in self.loading:
            self.loading[key] = self.load_steps

    def busy(self) -> bool:
        return bool(self.loading)

    def step(self, running=(), waiting=()) -> int:
        self.steps += 1
        self.pinned = set(running) & self.resident.keys()
        installed = 0
        for key in list(self.loading):
            if self.loading[key] > 0:
                self.loading[key] -= 1
                continue
            used = set(self.resident.values())
            free = [s for s in range(self.capacity) if s not in used]
            if not free:
                victims = [k for k in self.resident if k not in self.pinned]
                if not victims:
                    continue  # every resident delta is pinned: the load waits
                free = [self.resident.pop(victims[0])]
            if self.install is not None:
                self.install(free[0], key)
            self.resident[key] = free[0]
            del self.loading[key]
            installed += 1
        return installed


def run_engine(engine: Engine, requests: list[GenerationRequest], per_step: int = 2, limit_s: float = 60.0):
    """Submit ``per_step`` requests before each step; step until all finish. Returns request_id -> tokens."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: set[str] = set()
    pending = list(requests)
    deadline = time.monotonic() + limit_s
    while len(finished) < len(requests):
        assert time.monotonic() < deadline, f"engine stalled: {len(finished)}/{len(requests)} finished"
        for _ in range(per_step):
            if pending:
                engine.add_request(pending.pop(0))
        outs = engine.step()
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
            if o.finish_reason is not None:
                assert o.finish_reason in ("eos", "length"), o
                finished.add(o.request_id)
        if not outs:
            time.sleep(0.002)  # only waiting for a background delta load
    return tokens
