"""Engine test helpers: a fake slot manager with observable pins, and a synchronous driver of Engine.step."""
from __future__ import annotations

import collections
import time

from delta_store.records import DeltaKey
from server.engine import Engine
from server.types import GenerationRequest


class FakeSlots:
    """The slot-manager contract (acquire/release/install_ready) with observable pins.

    A key not resident starts a load that completes after ``load_steps`` calls of install_ready(); a finished
    load takes a free slot (or evicts the least recently used unpinned one). ``install`` (slot, key) lets
    engine tests copy a real delta into the model when a load lands; ``prompts`` (slot -> prompt part, e.g. a
    DeltaModel's ``prompt_of``) tells the engine which resident deltas carry virtual tokens.
    """

    def __init__(self, num_slots: int, load_steps: int = 0, install=None, prompts=None):
        self.num_slots = num_slots
        self.load_steps = load_steps
        self.install = install
        self.prompts = prompts or (lambda slot: None)
        self.installed: list[tuple[DeltaKey, int]] = []
        self.resident: collections.OrderedDict[DeltaKey, int] = collections.OrderedDict()  # LRU order
        self.pins: dict[int, int] = {}
        self.loading: dict[DeltaKey, int] = {}  # key -> install_ready calls left
        self.acquire_calls = 0

    def acquire(self, key: DeltaKey) -> int | None:
        self.acquire_calls += 1
        slot = self.resident.get(key)
        if slot is not None:
            self.resident.move_to_end(key)
            self.pins[slot] = self.pins.get(slot, 0) + 1
            return slot
        if key not in self.loading:
            self.loading[key] = self.load_steps
            if self.load_steps == 0:
                self.install_ready()
                return self.acquire(key) if key in self.resident else None
        return None

    def release(self, slot: int) -> None:
        assert self.pins.get(slot, 0) > 0, f"slot {slot} released more often than acquired"
        self.pins[slot] -= 1

    def prompt_of(self, slot: int):
        return self.prompts(slot)

    def resident_prompt(self, key: DeltaKey):
        slot = self.resident.get(key)
        return (False, None) if slot is None else (True, self.prompts(slot))

    def take_installed(self) -> list[tuple[DeltaKey, int]]:
        out, self.installed = [(k, s) for k, s in self.installed if self.prompts(s) is not None], []
        return out

    def install_ready(self) -> None:
        for key in list(self.loading):
            if self.loading[key] > 0:
                self.loading[key] -= 1
                continue
            used = set(self.resident.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if not free:
                victims = [k for k, s in self.resident.items() if self.pins.get(s, 0) == 0]
                if not victims:
                    continue  # every slot pinned: the load waits
                free = [self.resident.pop(victims[0])]
            slot = free[0]
            if self.install is not None:
                self.install(slot, key)
            self.resident[key] = slot
            self.installed.append((key, slot))
            del self.loading[key]

    @property
    def total_pins(self) -> int:
        return sum(self.pins.values())


def run_engine(engine: Engine, requests: list[GenerationRequest], per_step: int = 2, limit_s: float = 60.0,
               logprobs: dict[str, list[float]] | None = None):
    """Submit ``per_step`` requests before each step; step until all finish. Returns request_id -> tokens;
    ``logprobs`` (a dict) collects request_id -> the sampled tokens' logprobs of requests that asked for them."""
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

    rows: dict[str, object] = {}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: set[str] = set()
    pending = list(requests)
    deadline = time.monotonic() + limit_s
    while len(finished) < len(requests):
        assert time.monotonic() < deadline, f"engine stalled: {len(finished)}/{len(requests)} finished"
        for _ in range(per_step):
            if pending:
                req = pending.pop(0)
                rows[req.request_id] = engine.add_request(req).row
        outs = engine.step()
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
            if o.finish_reason is not None:
                assert o.finish_reason in ("eos", "length"), o
                finished.add(o.request_id)
        if not outs:
            time.sleep(0.002)
    rec = engine.runner.logits
    return {rid: (tokens[rid], torch.stack(rec[id(row)])) for rid, row in rows.items()}
