"""Iteration-level scheduler: which sequences run in the next step, and with how many tokens.

Pure Python, no torch: the policy is tested without a model. One call to :meth:`Scheduler.schedule`
builds one packed step (Orca's iteration-level scheduling; vLLM's chunked prefill):

1. Running sequences, highest priority first: decode tokens (1 each), then prefill chunks of partially
   prefilled prompts, all under ``max_batch_tokens``. A sequence whose next tokens need a KV block when none
   is free preempts the lowest-priority running sequence (by recompute: its blocks and slot pin are freed
   and it goes back to the front of its tenant's queue), or itself if it is the lowest.
2. Waiting sequences are admitted tenant by tenant, the tenant with the smallest *virtual token counter*
   first (VTC, Sheng et al., "Fairness in Serving Large Language Models", OSDI'24; S-LoRA's
   ``vtc_req_queue.py``): FIFO across tenants lets one tenant's flood delay everyone (vLLM #16876). A
   request is admitted only if its delta is resident: ``residency.lookup`` returns its slot, or None while
   the delta loads in the background (the request waits; others pass it) or while the memory it needs is
   held by running requests' deltas (S-LoRA, D6). The scheduler only asks: it never loads, installs,
   pins or frees anything (the residency owner does, once per step, ``server/deltas/residency.py``).
   An admitted sequence first takes its shared blocks (``prefix_cache.py``): the delta's prompt prefix
   (virtual tokens, computed once per delta version) and every cached full block of its tokens; only the
   rest is prefilled. Shared blocks are references: one sequence's end, preemption or cancellation never
   frees a block another sequence uses.
3. A bounded waiting queue: past ``max_waiting`` new work is refused with ``ResourceExhausted`` and a retry hint.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from delta_store.errors import InvalidArgument, ResourceExhausted
from delta_store.records import DeltaKey

from .prefix_cache import PrefixCache, PromptInfo
from .sequence import Sequence, SeqStatus

if TYPE_CHECKING:  # the pool lives beside the torch tensors; the scheduler only moves block ids
    from .block_pool import BlockPool

# VTC weights: a generated token costs about twice a prompt token of service (decode is memory-bound and
# holds KV for the whole output), the weights S-LoRA's VTC queue ships with (input 1, output 2).
PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0


class SlotSource(Protocol):
    """What the scheduler asks of the residency owner: resident (its slot)? None: not yet (it is asked for)."""

    def lookup(self, key: DeltaKey) -> int | None: ...
    def prompt_of(self, slot: int) -> PromptInfo | None: ...  # the resident delta's prompt part, if any


@dataclass(slots=True)
class SchedulerConfig:
    max_batch_tokens: int
    max_running: int
    max_waiting: int
    max_model_len: int
    block_size: int
    retry_after_s: float = 1.0  # hint sent with a refusal; the engine refines it from measured step times

    @classmethod
    def from_server(cls, config) -> "SchedulerConfig":
        return cls(config.max_batch_tokens, config.max_running, config.max_waiting, config.max_model_len,
                   config.kv_block_size)


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position of the chunk (== tokens already in the KV cache)
    num_tokens: int
    sample: bool  # the chunk reaches the sequence's last token: its logits give the next token


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decode chunks (1 token) first, then prefill
    preempted: list[Sequence] = field(default_factory=list)
    waiting_on_delta: int = 0  # waiting requests skipped because their delta is not resident yet
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # delta load failed: finished

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


def _blocks(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: "BlockPool", residency: SlotSource | None = None,
                 prefix: PrefixCache | None = None):
        self.config = config
        self.allocator = allocator
        self.residency = residency
        self.prefix = prefix if prefix is not None else PrefixCache(allocator, config.block_size, enabled=False)
        self.waiting: dict[str, collections.deque[Sequence]] = {}  # tenant -> FIFO (preempted at the front)
        self.running: list[Sequence] = []
        self.counters: dict[str, float] = {}  # tenant -> virtual tokens served (VTC)
        self._admit_counter = itertools.count(1)
        self._num_waiting = 0
        self.num_preemptions = 0
        # admissions of requests with a delta: resident when first asked (a device hit), or after a wait
        self.delta_admissions_resident = 0
        self.delta_admissions_waited = 0

    # ---- queue state -------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or self._num_waiting > 0

    def running_deltas(self) -> list[DeltaKey]:
        """Deltas of the running sequences: the residency owner pins them for the step."""
        return [s.delta for s in self.running if s.delta is not None]

    def waiting_deltas(self) -> list[DeltaKey]:
        """Deltas named by waiting sequences, fairest tenant first, each tenant's queue in order."""
        order = sorted(self.waiting, key=lambda t: (self.counters.get(t, 0.0), t))
        return [s.delta for t in order for s in self.waiting[t] if s.delta is not None]

    def _active_tenants(self) -> set[str]:
        active = {t for t, q in self.waiting.items() if q}
        active.update(s.tenant for s in self.running)
        return active

    # ---- admission control --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request, or refuse it (ResourceExhausted when the queue is full, InvalidArgument if
        it can never fit)."""
        cfg = self.config
        n_prompt = len(seq.prompt_ids)
        if n_prompt < 1:
            raise InvalidArgument(f"request {seq.request_id}: prompt_token_ids is empty")
        if n_prompt >= cfg.max_model_len:
            raise InvalidArgument(f"request {seq.request_id}: prompt of {n_prompt} tokens leaves no room to "
                                  f"generate under max_model_len={cfg.max_model_len}")
        longest = min(n_prompt + seq.sampling.max_new_tokens, cfg.max_model_len)
        if _blocks(longest, cfg.block_size) > self.allocator.num_blocks:
            raise InvalidArgument(f"request {seq.request_id}: {longest} tokens need "
                                  f"{_blocks(longest, cfg.block_size)} KV blocks, the cache has "
                                  f"{self.allocator.num_blocks}")
        if self._num_waiting >= cfg.max_waiting:
            raise ResourceExhausted(f"engine queue full: {self._num_waiting} requests waiting "
                                    f"(max_waiting={cfg.max_waiting}); retry later",
                                    retry_after=cfg.retry_after_s)
        tenant = seq.tenant
        if tenant not in self._active_tenants():
            # VTC lift: a tenant that was idle cannot bank credit and then starve the others.
            active = [self.counters.get(t, 0.0) for t in self._active_tenants()]
            base = min(active) if active else max(self.counters.values(), default=0.0)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), base)
        seq.status = SeqStatus.WAITING
        self.waiting.setdefault(tenant, collections.deque()).append(seq)
        self._num_waiting += 1

    # ---- leaving ----------------------------------------------------------------------------
    def _free(self, seq: Sequence) -> None:
        if seq.block_table or seq.pinned_blocks:
            self.allocator.free(seq.block_table + seq.pinned_blocks)  # references: shared blocks live on
            seq.block_table, seq.pinned_blocks, seq.block_hashes = [], [], []
        seq.slot = None  # no pin to give back: the residency owner pins the running set's deltas each step

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished, aborted, failed) and return its KV blocks at once (its delta is unpinned at
        the next step)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            queue = self.waiting.get(seq.tenant)
            if queue is not None and seq in queue:
                queue.remove(seq)
                self._num_waiting -= 1
                if not queue:
                    del self.waiting[seq.tenant]  # many short-lived tenants must not leave empty queues behind
        self._free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0  # recompute prompt + output on re-admission (less what is still cached then)
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.setdefault(seq.tenant, collections.deque()).appendleft(seq)
        self._num_waiting += 1
        self.num_preemptions += 1

    # ---- one step -----------------------------------------------------------------------------
    def _priority(self, seq: Sequence) -> tuple[float, int]:
        return (self.counters.get(seq.tenant, 0.0), seq.admit_order)  # smaller = served first

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = _blocks(seq.num_computed + num_tokens, self.config.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _charge(self, seq: Sequence, start: int, num_tokens: int) -> None:
        n_prompt = seq.num_virtual + len(seq.prompt_ids)  # slot space: the prompt ends after the virtual slots
        prompt_part = max(0, min(start + num_tokens, n_prompt) - start)
        self.counters[seq.tenant] = (self.counters.get(seq.tenant, 0.0) + prompt_part * PROMPT_TOKEN_COST
                                     + (num_tokens - prompt_part) * OUTPUT_TOKEN_COST)

    def _take(self, out: SchedulerOutput, seq: Sequence, num_tokens: int) -> None:
        start = seq.num_computed
        chunk = ScheduledChunk(seq, start, num_tokens, start + num_tokens == seq.num_tokens)
        seq.num_computed += num_tokens
        self._charge(seq, start, num_tokens)
        out.chunks.append(chunk)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_batch_tokens
        # 1. running sequences: decodes first (1 token each), then unfinished prefills, by priority.
        order = sorted(self.running, key=self._priority)
        order.sort(key=lambda s: s.num_uncomputed > 1)  # stable: keeps priority inside each group
        scheduled: set[int] = set()
        for seq in order:
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self._grow(seq, n):
                victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
                if not victims:
                    break
                victim = max(victims, key=self._priority)
                if self._priority(victim) < self._priority(seq):
                    victim = seq  # the sequence itself is the lowest priority left
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            if _blocks(seq.num_computed + n, self.config.block_size) > len(seq.block_table):
                # nothing left to preempt: shrink the chunk to the rows it already owns (never happens for decode,
                # whose block was checked against the whole pool at add()).
                n = len(seq.block_table) * self.config.block_size - seq.num_computed
                if n <= 0:
                    self._preempt(seq)
                    out.preempted.append(seq)
                    continue
            self._take(out, seq, n)
            scheduled.add(id(seq))
            budget -= n
        # 2. admissions, fairest tenant first; decode chunks stay in front of prefill chunks. Not in a step
        # that preempted: the freed blocks are what the running sequences need next (vLLM V1 does the same).
        loading: dict[DeltaKey, bool] = {}
        blocked: set[str] = set()
        skipped: set[int] = set()  # waiting sequences passed over because their delta is not resident
        while not out.preempted and budget > 0 and len(self.running) < self.config.max_running:
            candidates = [t for t, q in self.waiting.items() if q and t not in blocked]
            if not candidates:
                break
            tenant = min(candidates, key=lambda t: (self.counters.get(t, 0.0), t))
            admitted, stop = self._admit_one(tenant, budget, loading, skipped, out)
            if stop:
                break
            if admitted is None:
                blocked.add(tenant)
                continue
            budget -= out.chunks[-1].num_tokens
        # Decode chunks first (the attention's padded decode block), and inside each group the tokens of one
        # delta slot contiguous: the delta kernels then see runs instead of interleaved slots (8 deltas over
        # 32 decodes: 8 runs of 4 tokens, which the CPU backend serves with plain matmuls on views).
        out.chunks.sort(key=lambda c: (c.num_tokens > 1, -1 if c.seq.slot is None else c.seq.slot))
        out.waiting_on_delta = len(skipped)
        return out

    def _admit_one(self, tenant: str, budget: int, loading: dict, skipped: set, out: SchedulerOutput):
        """Admit the first request of ``tenant`` whose delta is resident. Returns (seq | None, stop_all)."""
        queue = self.waiting[tenant]
        bs = self.config.block_size
        for seq in queue:
            if self.allocator.num_free < 1:
                return None, True  # out of KV: nobody else can be admitted this step either
            slot = -1
            key = seq.delta
            if key is not None and self.residency is not None:
                if loading.get(key):
                    seq.waited_on_delta = True
                    skipped.add(id(seq))
                    continue
                try:
                    acquired = self.residency.lookup(key)
                except Exception as exc:  # noqa: BLE001 - the load failed: this request fails, others go on
                    self.finish(seq, "error")
                    out.failed.append((seq, exc))
                    return None, False
                if acquired is None:
                    loading[key] = True  # loading in the background or waiting for memory: others go first
                    seq.waited_on_delta = True
                    skipped.add(id(seq))
                    continue
                slot = acquired
            part = self.residency.prompt_of(slot) if slot >= 0 else None
            too_long = self.too_long(seq, part)
            if too_long is not None:
                self.finish(seq, "error")
                out.failed.append((seq, too_long))
                return None, False
            if not self.prefix.attach(seq, slot, part):
                return None, True  # its prompt prefix does not fit now; neither does anyone behind it
            room = len(seq.block_table) * bs - seq.num_computed + self.allocator.num_free * bs
            n = min(seq.num_uncomputed, budget, room)
            if n <= 0:
                self._free(seq)
                seq.num_computed = 0
                return None, True
            if key is not None and self.residency is not None:  # admitted with its delta: a device hit, or after a load
                if seq.waited_on_delta:
                    self.delta_admissions_waited += 1
                else:
                    self.delta_admissions_resident += 1
            queue.remove(seq)
            self._num_waiting -= 1
            if not queue:
                del self.waiting[tenant]
            seq.slot = slot
            seq.status = SeqStatus.RUNNING
            seq.admit_order = next(self._admit_counter)
            self.running.append(seq)
            grown = self._grow(seq, n)
            assert grown, "admission checked the free rows"
            self._take(out, seq, n)
            return seq, False
        return None, False

    def too_long(self, seq: Sequence, part: PromptInfo | None) -> InvalidArgument | None:
        """The delta's virtual tokens hold KV slots like prompt tokens, so they count against max_model_len: the
        edge's rule (prompt + max_new_tokens <= max_model_len, checked before the delta is known) with them added."""
        n_virtual = part.num_virtual_tokens if part is not None else 0
        n_prompt, n_new, limit = len(seq.prompt_ids), seq.sampling.max_new_tokens, self.config.max_model_len
        if n_virtual and n_prompt + n_virtual + n_new > limit:
            return InvalidArgument(f"request {seq.request_id}: prompt of {n_prompt} tokens plus the delta's {n_virtual} "
                                   f"virtual tokens plus max_new_tokens {n_new} = {n_prompt + n_virtual + n_new} "
                                   f"exceeds max_model_len={limit}")
        need = _blocks(n_virtual + n_prompt + n_new, self.config.block_size)
        if n_virtual and need > self.allocator.num_blocks:  # it would wait for blocks forever
            return InvalidArgument(f"request {seq.request_id}: {n_prompt} tokens, {n_virtual} virtual tokens and "
                                   f"{n_new} new ones need {need} KV blocks, the cache has {self.allocator.num_blocks}")
        return None
