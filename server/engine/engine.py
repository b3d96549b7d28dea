"""The generation engine: continuous batching over a paged KV cache, one packed forward per step (D6).

    step():  residency.step (the one place deltas become resident) -> schedule -> run the model on one packed
             batch -> sample -> emit

``step()`` is synchronous (tests drive it directly); ``start()`` runs it in a loop on the asyncio event loop
with the forward (and sampling) in a one-thread executor, so gRPC handlers keep running while the model
computes. Every mutation of scheduler state (add, abort, schedule, emit) happens on the loop thread, between
forwards: a block freed by ``abort`` while a forward is in flight cannot be handed out before that forward
ends, because handing blocks out is the next ``schedule``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from delta_store.errors import FailedPrecondition, InvalidArgument, Unavailable

from ..config import ServerConfig
from ..types import FinishReason, GenerationRequest, TokenOutput
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, StepInput, StepResult
from .prefix_cache import PrefixCache, delta_seed
from .sampling import SampleRow, make_generator
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence
from .stats import RequestStats, StepStats

log = logging.getLogger("deltaserve.engine")

IDLE_POLL_S = 0.002  # work is waiting only for a delta load (or a preload is on its way): step this often


@dataclass(slots=True, eq=False)
class _Live:
    """Engine-side state of one request: what the scheduler does not need."""

    seq: Sequence
    row: SampleRow
    detok: IncrementalDetokenizer | None
    stop_ids: frozenset[int]
    queue: asyncio.Queue | None = None  # generate() consumers
    outputs: list[TokenOutput] = field(default_factory=list)  # step() callers without asyncio


@dataclass(slots=True)
class _Plan:
    sched: SchedulerOutput
    step_input: StepInput
    started: float
    forward_time: float = 0.0


class Engine:
    def __init__(self, config: ServerConfig, runner: ModelRunner, residency=None):
        """``residency``: the owner of device residency (``server/deltas/residency.py``), None for a base-only
        engine."""
        if not config.max_model_len:  # 0 = "the model's limit", resolved by server.app.with_max_model_len
            raise ValueError("Engine needs a resolved max_model_len (got 0)")
        self.config = config
        self.runner = runner
        self.residency = residency
        base_seed = runner.dm.spec.fingerprint if runner.dm is not None else type(runner.model).__name__
        self.prefix = PrefixCache(runner.kv.allocator, config.kv_block_size, enabled=config.prefix_caching,
                                  base_seed=base_seed)
        self.scheduler = Scheduler(SchedulerConfig.from_server(config), runner.kv.allocator, residency, self.prefix)
        self._live: dict[str, _Live] = {}
        self._listeners: list[Callable] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._accepting = True
        self._running = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.step_count = 0
        self._step_time_ema = 0.05
        self._eos = runner.eos_token_ids

    # ---- public API ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._running and self._task is not None and not self._task.done()

    def add_listener(self, fn: Callable[[StepStats | RequestStats], None]) -> None:
        self._listeners.append(fn)

    def add_request(self, req: GenerationRequest) -> _Live:
        """Queue a request. Raises InvalidArgument, FailedPrecondition, ResourceExhausted or Unavailable."""
        if not self._accepting:
            raise Unavailable("engine is shutting down; retry on another replica", retry_after=1.0)
        if req.request_id in self._live:
            raise InvalidArgument(f"request {req.request_id}: a request with this id is already running")
        if req.delta is not None and self.residency is None:
            raise FailedPrecondition(f"request {req.request_id}: this engine serves the base model only (no deltas)")
        vocab = self.runner.model.config.get_text_config().vocab_size
        if any(not (0 <= t < vocab) for t in req.prompt_token_ids):
            raise InvalidArgument(f"request {req.request_id}: prompt token id out of range [0, {vocab})")
        if req.sampling.stop_strings and self.runner.tokenizer is None:
            raise InvalidArgument(f"request {req.request_id}: stop_strings need a tokenizer, this engine has none")
        if not req.arrival_time:
            req.arrival_time = time.monotonic()
        seq = Sequence(req, arrival_step=self.step_count)
        if req.delta is not None:  # a resident prompt delta's virtual tokens are known now (else: at admission)
            too_long = self.scheduler.too_long(seq, self.residency.resident_prompt(req.delta)[1])
            if too_long is not None:
                raise too_long
        p = req.sampling
        history = list(req.prompt_token_ids) if p.repetition_penalty != 1.0 else None
        row = SampleRow(p, make_generator(p), history)
        detok = None
        if self.runner.tokenizer is not None:
            detok = IncrementalDetokenizer(self.runner.tokenizer, req.prompt_token_ids, p.stop_strings)
        self._retry_hint()
        self.scheduler.add(seq)  # may raise ResourceExhausted with a retry hint
        if req.delta is not None:
            self.residency.request(req.delta)  # prefetch: the load starts now, not when the request is admitted
        live = _Live(seq, row, detok, frozenset(p.stop_token_ids))
        self._live[req.request_id] = live
        if self._wake is not None:
            self._wake.set()
        return live

    def wake(self) -> None:
        """Wake an idle step loop (any thread): a delta load finished, or a preload wants an install."""
        loop, wake = self._event_loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenOutput]:
        """Stream TokenOutput chunks; leaving the iteration early (client gone) aborts the request."""
        live = self.add_request(req)
        live.queue = asyncio.Queue()
        for out in live.outputs:  # anything emitted before the queue existed
            live.queue.put_nowait(out)
        live.outputs.clear()
        done = False
        try:
            while True:
                out = await live.queue.get()
                done = out.finish_reason is not None
                yield out
                if done:
                    return
        finally:
            if not done:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> bool:
        """Free the request's KV blocks now (its delta is unpinned at the next step); its stream ends with
        finish_reason "aborted".
        Call it on the event loop's thread (gRPC handlers do), like every other engine method."""
        live = self._live.get(request_id)
        if live is None:
            return False
        self._finish(live, FinishReason.ABORTED, TokenOutput(request_id, []))
        return True

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltaserve-forward")
        self._wake = asyncio.Event()
        self._event_loop = asyncio.get_running_loop()
        if self.residency is not None:
            self.residency.on_ready = self.wake
        self._running = True
        self._task = asyncio.create_task(self._loop(), name="deltaserve-engine")

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse new work, let running requests finish for up to ``grace_s``, then abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.01)
        for request_id in list(self._live):
            self.abort(request_id)
        self._running = False
        if self._task is not None:
            self._wake.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        """One synchronous step; returns the outputs it emitted (also queued to generate() consumers)."""
        plan = self._schedule()
        if plan is None:
            return []
        t0 = time.monotonic()
        try:
            result = self.runner.execute(plan.step_input)
        except Exception as exc:  # noqa: BLE001 - the batch fails, the engine stays up
            return self._fail(plan, exc)
        plan.forward_time = time.monotonic() - t0
        return self._emit(plan, result)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            try:
                plan = self._schedule()
            except Exception as exc:  # noqa: BLE001 - e.g. an install failed: fail what is queued, keep serving
                log.exception("engine schedule failed")
                for request_id in list(self._live):
                    live = self._live[request_id]
                    self._finish(live, FinishReason.ERROR, TokenOutput(request_id, [], error=f"engine: {exc}"))
                continue
            if plan is None:
                self._wake.clear()
                if self.scheduler.has_work() or (self.residency is not None and self.residency.busy()):
                    await asyncio.sleep(IDLE_POLL_S)  # waiting for a delta to load, or a preload to install
                else:
                    await self._wake.wait()
                continue
            t0 = time.monotonic()
            try:
                result = await loop.run_in_executor(self._executor, self.runner.execute, plan.step_input)
            except Exception as exc:  # noqa: BLE001
                log.exception("engine step failed")
                self._fail(plan, exc)
                continue
            plan.forward_time = time.monotonic() - t0
            self._emit(plan, result)

    def _schedule(self) -> _Plan | None:
        started = time.monotonic()
        if self.residency is not None:  # pins, frees and installs: the only device writes of the delta tier
            self.residency.step(self.scheduler.running_deltas(), self.scheduler.waiting_deltas())
            self._prepare_prefixes()
        sched = self.scheduler.schedule()
        for seq, exc in sched.failed:  # its delta could not be loaded (or its prompt is too long): it fails alone
            live = self._live.get(seq.request_id)
            if live is not None:
                error = str(exc) if isinstance(exc, InvalidArgument) else f"delta load: {exc}"
                self._finish(live, FinishReason.ERROR, TokenOutput(seq.request_id, [], error=error,
                                                                  error_code=getattr(exc, "code", None)))
        inp = StepInput()
        inp.prompt_jobs, inp.block_copies = self.prefix.take_jobs()
        if sched.is_empty and not inp.prompt_jobs:
            return None
        for chunk in sched.chunks:
            seq = chunk.seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = started
            row = self._live[seq.request_id].row if chunk.sample else None
            inp.add(seq.token_ids(chunk.start, chunk.start + chunk.num_tokens), chunk.start, seq.block_table,
                    seq.slot if seq.slot is not None else -1, row, seq.position_offset - seq.num_virtual)
        return _Plan(sched, inp, started)

    def _prepare_prefixes(self) -> None:
        """The load path of a prompt delta (D14): once its version is resident, queue its shared KV prefix for the
        step being planned. No pin is needed: the residency owner writes only in ``step``, which runs once per
        step before the plan, so a delta installed there stays in its slot until this step's forward is done."""
        for key, slot in self.residency.take_installed():
            part = self.residency.prompt_of(slot)
            if part is None or self.residency.slot_of(key) != slot:
                continue  # deleted meanwhile; a later version's request computes its own prefix
            self.prefix.prepare(delta_seed(key.digest), slot, part)

    def _step_ended(self, ok: bool, plan: _Plan) -> None:
        if ok:
            self.prefix.commit([c.seq for c in plan.sched.chunks])
        else:
            self.prefix.abort()

    def _emit(self, plan: _Plan, result: StepResult) -> list[TokenOutput]:
        self._step_ended(True, plan)  # register the full blocks this step wrote, before any sequence leaves
        now = time.monotonic()
        emitted: list[TokenOutput] = []
        sampled = [c for c in plan.sched.chunks if c.sample]
        for j, chunk in enumerate(sampled):
            seq = chunk.seq
            live = self._live.get(seq.request_id)
            if live is None or live.seq is not seq:
                continue  # aborted while the forward ran
            token = result.token_ids[j]
            seq.output_ids.append(token)
            if live.row.history is not None:
                live.row.history.append(token)
            if seq.first_token_time is None:
                seq.first_token_time, seq.first_token_step = now, self.step_count
            seq.last_token_time = now
            text = live.detok.push([token]) if live.detok is not None else ""
            out = TokenOutput(seq.request_id, [token], text,
                              logprobs=[result.logprobs[j]] if seq.sampling.logprobs and result.logprobs else None,
                              prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids))
            reason = self._finish_reason(live, token)
            if reason is not None:
                if live.detok is not None and reason != FinishReason.STOP:
                    out.text += live.detok.flush()
                self._finish(live, reason, out, deliver=False)
            self._deliver(live, out)
            emitted.append(out)
        self._step_done(plan, now)
        return emitted

    def _finish_reason(self, live: _Live, token: int) -> str | None:
        seq, p = live.seq, live.seq.sampling
        if token in live.stop_ids or (live.detok is not None and live.detok.stopped):
            return FinishReason.STOP
        if token in self._eos and not p.ignore_eos:
            return FinishReason.EOS
        if len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    # ---- leaving ------------------------------------------------------------------------------
    def _finish(self, live: _Live, reason: str, out: TokenOutput, *, deliver: bool = True) -> None:
        seq = live.seq
        self.scheduler.finish(seq, reason)  # KV blocks and slot pin back now
        self._live.pop(seq.request_id, None)
        now = time.monotonic()
        arrival = seq.request.arrival_time
        out.finish_reason = reason
        out.prompt_tokens = len(seq.prompt_ids)
        out.completion_tokens = len(seq.output_ids)
        out.queue_time = (seq.first_scheduled_time or now) - arrival
        out.ttft = None if seq.first_token_time is None else seq.first_token_time - arrival
        out.total_time = now - arrival
        if deliver:
            self._deliver(live, out)
        n_out = len(seq.output_ids)
        tpot = None
        if n_out > 1 and seq.first_token_time is not None:
            tpot = (seq.last_token_time - seq.first_token_time) / (n_out - 1)
        self._publish(RequestStats(seq.request_id, seq.tenant, seq.delta is not None, reason, len(seq.prompt_ids),
                                   n_out, out.queue_time, out.ttft, tpot, out.total_time, seq.num_preemptions))

    def _fail(self, plan: _Plan, exc: Exception) -> list[TokenOutput]:
        self._step_ended(False, plan)  # the prefixes it was to compute were not written
        outs = []
        for chunk in plan.sched.chunks:
            live = self._live.get(chunk.seq.request_id)
            if live is None:
                continue
            out = TokenOutput(chunk.seq.request_id, [], error=f"{type(exc).__name__}: {exc}",
                              error_code=getattr(exc, "code", None))
            self._finish(live, FinishReason.ERROR, out)
            outs.append(out)
        self._step_done(plan, time.monotonic())
        return outs

    @staticmethod
    def _deliver(live: _Live, out: TokenOutput) -> None:
        if live.queue is not None:
            live.queue.put_nowait(out)
        else:
            live.outputs.append(out)

    # ---- stats --------------------------------------------------------------------------------
    def _step_done(self, plan: _Plan, now: float) -> None:
        self.step_count += 1
        step_time = now - plan.started
        self._step_time_ema = 0.9 * self._step_time_ema + 0.1 * step_time
        chunks = plan.sched.chunks
        decode = sum(1 for c in chunks if c.num_tokens == 1)
        alloc = self.runner.kv.allocator
        self._publish(StepStats(
            step=self.step_count, step_time=step_time, forward_time=plan.forward_time, num_tokens=plan.sched.num_tokens,
            prefill_tokens=plan.sched.num_tokens - decode, decode_tokens=decode, num_seqs=len(chunks),
            num_deltas=len({s for s in plan.step_input.slots if s >= 0}), num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting, waiting_on_delta=plan.sched.waiting_on_delta,
            num_preempted=len(plan.sched.preempted), kv_blocks_used=alloc.num_used, kv_blocks_total=alloc.num_blocks,
            kv_blocks_cached=alloc.num_cached, prefix_lookups=self.prefix.stats.lookups,
            prefix_hits=self.prefix.stats.hits, prefix_evictions=alloc.evictions,
            prompt_prefixes=self.prefix.stats.prompt_computes))

    def _retry_hint(self) -> None:
        # A full queue drains at about max_running requests per max_new_tokens steps; 32 steps is a
        # conservative "try again soon" that tracks the measured step time.
        self.scheduler.config.retry_after_s = min(30.0, max(0.1, 32 * self._step_time_ema))

    def _publish(self, stats) -> None:
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:  # noqa: BLE001 - a broken listener must not stop serving
                log.exception("stats listener failed")
