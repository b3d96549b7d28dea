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

    def __init__(self, capacity: int, load_steps: int = 0, install=None, prompts=None):
        """``prompts`` (slot -> prompt part, e.g. a DeltaModel's ``prompt_of``) tells the engine which resident
        deltas carry virtual tokens."""
        self.capacity = capacity
        self.load_steps = load_steps
        self.install = install
        self.prompts = prompts or (lambda slot: None)
        self.installed: list[tuple[DeltaKey, int]] = []
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

    def slot_of(self, key: DeltaKey) -> int | None:
        return self.resident.get(key)

    def prompt_of(self, slot: int):
        return self.prompts(slot)

    def resident_prompt(self, key: DeltaKey):
        slot = self.resident.get(key)
        return (False, None) if slot is None else (True, self.prompts(slot))

    def take_installed(self) -> list[tuple[DeltaKey, int]]:
        out, self.installed = [(k, s) for k, s in self.installed if self.prompts(s) is not None], []
        return out

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
            self.installed.append((key, free[0]))
            del self.loading[key]
            installed += 1
        return installed


def run_engine(engine: Engine, requests: list[GenerationRequest], per_step: int = 2, limit_s: float = 60.0,
               logprobs: dict[str, list[float]] | None = None, added: dict | None = None):
    """Submit ``per_step`` requests before each step; step until all finish. Returns request_id -> tokens;
    ``logprobs`` (a dict) collects request_id -> the sampled tokens' logprobs of requests that asked for them;
    ``added`` (a dict) collects request_id -> what ``engine.add_request`` returned for it."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: set[str] = set()
    pending = list(requests)
    deadline = time.monotonic() + limit_s
    while len(finished) < len(requests):
        assert time.monotonic() < deadline, f"engine stalled: {len(finished)}/{len(requests)} finished"
        for _ in range(per_step):
            if pending:
                req = pending.pop(0)
                handle = engine.add_request(req)
                if added is not None:
                    added[req.request_id] = handle
        outs = engine.step()
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
            if logprobs is not None and o.logprobs:
                logprobs.setdefault(o.request_id, []).extend(o.logprobs)
            if o.finish_reason is not None:
                assert o.finish_reason in ("eos", "length"), o
                finished.add(o.request_id)
        if not outs:
            time.sleep(0.002)  # only waiting for a background delta load
    return tokens


class LogitsRunner:
    """Wraps a ModelRunner so that every step also returns its sampled rows' logits, recorded per SampleRow
    (the engine's per-request sampling state): what parity tests compare with a library's logits."""

    def __init__(self, runner):
        self.inner = runner
        self.logits: dict[int, list] = {}  # id(SampleRow) -> [vocab] tensors, one per sampled step
        self._rows: list = []  # keeps every recorded row alive, so no id is reused by a later request

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, step):
        step.want_logits = True
        result = self.inner.execute(step)
        for row, logits in zip(step.sample_rows, result.logits if result.logits is not None else []):
            if id(row) not in self.logits:
                self._rows.append(row)
            self.logits.setdefault(id(row), []).append(logits.clone())
        return result


def run_engine_logits(engine: Engine, requests: list[GenerationRequest], per_step: int = 2, limit_s: float = 120.0):
    """Like :func:`run_engine` on an engine whose runner is a :class:`LogitsRunner`; returns request_id ->
    (tokens, [steps, vocab] logits the engine sampled them from)."""
    import torch

    added: dict[str, object] = {}
    tokens = run_engine(engine, requests, per_step, limit_s, added=added)
    rec = engine.runner.logits
    return {rid: (tokens[rid], torch.stack(rec[id(handle.row)])) for rid, handle in added.items()}


def residency_for(dm, deltas: dict, hold: int | None = None):
    """The real residency owner serving ``deltas`` (DeltaKey.name -> Delta) into ``dm``, with a delta budget that
    holds the ``hold`` largest of them at once (fewer than there are: evictions), or all of them (None)."""
    from server.deltas.residency import Residency

    sizes = sorted((dm.footprint(d) for d in deltas.values()), reverse=True)
    k = len(sizes) if hold is None else hold
    budget = sum(sizes[:k]) + dm.slot_bytes * 2 * (k + 1)  # the per-slot tables grow by 1.25x: 2x is room
    return Residency(dm, lambda key: deltas[key.name], budget)
