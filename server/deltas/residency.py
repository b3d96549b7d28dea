"""Residency: the one owner of which delta versions are on the device (D13). The engine calls ``step`` once per
step, between forwards; every device write of the delta tier happens there, on the step loop.

    scheduler    residency.lookup(key) -> slot | None      resident? (None: ask for it and wait; may raise)
    engine       residency.request(key)                    a queued request names a delta: start its load now
                 residency.step(running, waiting)          once per step: pins, frees, evictions, installs
                 residency.take_installed()                prompt deltas installed by this step: their KV prefix
                                                           is computed in this step's forward (D14)
    edge         residency.request(key, notify=True)       PreloadDelta: a future set when it is resident
                 residency.invalidate(key)                 a deleted version (any thread): freed once unused
                 residency.resident()                      the router view's resident list

Tiers (S-LoRA, LoRAX): disk or the host tier (``delta_store/host_cache.py``, LRU by bytes) -> a load thread
validates the delta and converts it to host rows (``DeltaModel.stage``, pinned on CUDA) -> ``step`` installs
it into the arenas (``pages.py``) within ``budget_bytes``. Memory is counted in bytes, each delta its own
footprint (bucketed rows, D13), never in slots: the number of resident deltas follows from their sizes.

Policy:
* *Pins* are derived, never counted: a delta is pinned while a running sequence uses it (``step``'s
  ``running``), so a finished, aborted or preempted request can never leak a pin.
* *Eviction* is LRU among unpinned deltas, those no waiting request names first.
* *Prefetch*: a load starts as soon as a request is queued (S-LoRA's prefetch of the waiting queue's deltas).
* *No starvation*: when a delta a waiting request needs cannot be installed because pinned deltas hold the
  memory, ``lookup`` stops admitting requests that would pin another resident delta, so the pinned set only
  shrinks until it fits; running requests always finish, so this never deadlocks.
* A replaced version has another ``DeltaKey`` (its digest), so it is another delta: running requests keep the
  old one, new ones get the new one (vLLM #42125: a same-name reload served stale weights).
* A failed load is raised by ``lookup`` to the requests waiting for it during the next step, then forgotten;
  a later request loads afresh.
"""
from __future__ import annotations

import concurrent.futures
import heapq
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from delta_store.delta import Delta
from delta_store.errors import InvalidArgument, ResourceExhausted
from delta_store.records import DeltaKey

from .model import DeltaModel, StagedDelta
from .pages import NoRoom

INSTALL_BYTES_PER_STEP = 128 << 20
"""Most bytes one step installs (at least one delta): a burst of preloads does not stall a step for seconds."""
READY_BYTES_MAX = 512 << 20
"""Most staged (host) bytes waiting for an install; further loads start as installs drain them."""


@dataclass(frozen=True, slots=True)
class ResidencyStats:
    budget_bytes: int  # delta_memory_bytes
    capacity_bytes: int  # allocated arenas and slot tables (live cells, free cells, neutral rows)
    held_bytes: int  # what the resident deltas' cells hold (the sum of their footprints)
    real_bytes: int  # the resident deltas' own bytes in the served dtype
    resident: int
    pinned: int  # resident deltas a running request uses
    loading: int  # loads running on worker threads
    ready: int  # loaded, waiting for an install
    queued: int  # requested, not started
    hits: int  # lookups answered by a resident delta
    misses: int  # loads started for a lookup or request
    evictions: int
    loads: int  # completed loads (host tier or disk, then staged)
    load_errors: int
    load_seconds: float
    install_seconds: float  # time in step() copying into the arenas
    blocked: int  # 1 while a waiting request's delta waits for pinned memory to free


class Residency:
    def __init__(self, dm: DeltaModel, loader: Callable[[DeltaKey], Delta], budget_bytes: int, *,
                 load_workers: int = 2, pin_memory: bool = False):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
            raise InvalidArgument(f"delta memory budget must be a positive number of bytes, got {budget_bytes!r}")
        if not isinstance(load_workers, int) or load_workers < 1:
            raise InvalidArgument(f"load_workers must be a positive integer, got {load_workers!r}")
        self.dm = dm
        self.loader = loader
        self.budget = budget_bytes
        self.pin_memory = pin_memory
        self.load_workers = load_workers
        self._lock = threading.RLock()
        self._where: dict[DeltaKey, int] = {}  # resident key -> slot
        self._lru: OrderedDict[DeltaKey, None] = OrderedDict()  # resident keys, least recently used first
        self._footprint: dict[DeltaKey, tuple[int, int]] = {}  # resident key -> (footprint, real bytes)
        self._free_slots: list[int] = []  # a heap of freed slot numbers
        self._next_slot = 0
        self._pinned: set[DeltaKey] = set()
        self._doomed: set[DeltaKey] = set()  # invalidated while resident: freed once unpinned
        self._queue: OrderedDict[DeltaKey, None] = OrderedDict()  # requested, load not started
        self._loading: set[DeltaKey] = set()
        self._dropped: set[DeltaKey] = set()  # invalidated while loading: discard the result
        self._ready: OrderedDict[DeltaKey, StagedDelta] = OrderedDict()
        self._ready_bytes = 0
        self._errors: dict[DeltaKey, tuple[BaseException, int]] = {}  # key -> (error, step it was recorded at)
        self._waiters: dict[DeltaKey, list[concurrent.futures.Future]] = {}
        self._blocked: DeltaKey | None = None
        self._ahead: set[DeltaKey] = set()  # waiting deltas before the blocked one: they may still be pinned
        self._installed: list[tuple[DeltaKey, int]] = []  # prompt deltas installed since take_installed()
        self._held = self._real = 0
        self._capacity = 0
        self._steps = 0
        self._hits = self._misses = self._evictions = self._loads = self._load_errors = 0
        self._load_seconds = self._install_seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="delta-load")
        self.on_ready: Callable[[], None] | None = None  # set by the engine: wake an idle step loop

    # ---- the scheduler's and the engine's calls (step loop) -------------------------------------
    def lookup(self, key: DeltaKey) -> int | None:
        """The slot of ``key`` if it is resident and may be used now, else None after asking for it to be loaded.
        Raises the error of a failed load of ``key`` (to every request that asks during the step after it)."""
        with self._lock:
            failed = self._errors.get(key)
            if failed is not None:
                raise failed[0]
            slot = self._where.get(key)
            if slot is not None and key not in self._doomed:
                if self._blocked is not None and key not in self._pinned and key not in self._ahead:
                    return None  # memory is owed to a waiting request's delta: pin nothing behind it until it fits
                self._hits += 1
                self._lru.move_to_end(key)
                return slot
            self._request(key)
            return None

    def request(self, key: DeltaKey, *, notify: bool = False) -> concurrent.futures.Future | None:
        """Start loading ``key`` unless it is resident or on its way (any thread). ``notify``: a future that
        completes with the slot once it is resident (or with the load's error)."""
        with self._lock:
            future = None
            if notify:
                future = concurrent.futures.Future()
                slot = self._where.get(key)
                if slot is not None and key not in self._doomed:
                    future.set_result(slot)
                    return future
                self._waiters.setdefault(key, []).append(future)
            self._request(key)
            return future

    def slot_of(self, key: DeltaKey) -> int | None:
        with self._lock:
            slot = self._where.get(key)
            return None if key in self._doomed else slot

    def resident(self) -> list[DeltaKey]:
        """The versions resident now and still served (for the router view's resident-delta list)."""
        with self._lock:
            return [k for k in self._where if k not in self._doomed]

    def prompt_of(self, slot: int):
        """The prompt part (``delta_store.prompt.PromptPart``, on the device) of the delta in ``slot``, or None."""
        return self.dm.prompt_of(slot)

    def resident_prompt(self, key: DeltaKey):
        """``(True, prompt part or None)`` for a resident version; ``(False, None)`` while it is not."""
        with self._lock:
            slot = self.slot_of(key)
            return (False, None) if slot is None else (True, self.dm.prompt_of(slot))

    def take_installed(self) -> list[tuple[DeltaKey, int]]:
        """(key, slot) of every version with a prompt part installed since the last call, oldest first. The engine
        computes their shared KV prefix in the forward of the step that installed them: nothing is evicted or
        moved before the next ``step``, so no pin is needed while it runs."""
        with self._lock:
            out, self._installed = self._installed, []
            return out

    def busy(self) -> bool:
        """Loads queued, running or waiting for an install: the engine keeps stepping (an idle engine too)."""
        with self._lock:
            return bool(self._queue or self._loading or self._ready or self._doomed_unpinned())

    def step(self, running: Iterable[DeltaKey] = (), waiting: Iterable[DeltaKey] = ()) -> int:
        """Once per engine step, on the step loop, between forwards: ``running`` are the deltas of the running
        sequences (pinned until the next call), ``waiting`` those of queued requests in the order they would be
        admitted. Frees unused deleted versions, installs finished loads (evicting LRU unpinned deltas as the
        budget requires) and returns how many it installed."""
        waiting = list(dict.fromkeys(waiting))
        with self._lock:
            self._steps += 1
            self._errors = {k: v for k, v in self._errors.items() if self._steps - v[1] < 2}
            self._pinned = set(running) & self._where.keys()
            for key in self._pinned:
                self._lru.move_to_end(key)
            for key in [k for k in self._doomed if k not in self._pinned]:
                self._evict(key, counted=False)
            for key in waiting:  # a request queued while its load was refused or forgotten: ask again
                if key not in self._where and key not in self._errors:
                    self._request(key)
            installed = self._install_ready(waiting)
            self._capacity = self.dm.capacity_bytes()
            self._start_loads()
        return installed

    def invalidate(self, key: DeltaKey) -> None:
        """A deleted version (any thread): never handed out again; its memory goes at the next step once no
        running request uses it."""
        with self._lock:
            self._queue.pop(key, None)
            staged = self._ready.pop(key, None)
            if staged is not None:
                self._ready_bytes -= staged.footprint
            self._errors.pop(key, None)
            if key in self._loading:
                self._dropped.add(key)
            if key in self._where:
                self._doomed.add(key)
            for future in self._waiters.pop(key, []):
                future.cancel()

    def stats(self) -> ResidencyStats:
        with self._lock:
            return ResidencyStats(self.budget, self._capacity, self._held, self._real, len(self._where),
                                  len(self._pinned & self._where.keys()), len(self._loading), len(self._ready),
                                  len(self._queue), self._hits, self._misses, self._evictions, self._loads,
                                  self._load_errors, self._load_seconds, self._install_seconds,
                                  int(self._blocked is not None))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals (lock held) ------------------------------------------------------------------
    def _doomed_unpinned(self) -> bool:
        return any(k not in self._pinned for k in self._doomed)

    def _request(self, key: DeltaKey) -> None:
        if key in self._where and key not in self._doomed:
            return
        if key in self._queue or key in self._loading or key in self._ready:
            return
        self._misses += 1
        self._queue[key] = None
        self._start_loads()

    def _start_loads(self) -> None:
        while self._queue and len(self._loading) < self.load_workers and self._ready_bytes < READY_BYTES_MAX:
            key, _ = self._queue.popitem(last=False)
            self._loading.add(key)
            self._pool.submit(self._load, key)

    def _load(self, key: DeltaKey) -> None:
        """A worker thread: disk or host tier -> checked, staged host rows."""
        t0 = time.perf_counter()
        try:
            staged = self.dm.stage(self.loader(key), pin=self.pin_memory)
            if staged.footprint + self.dm.slot_bytes > self.budget:  # refused at upload by the same measure
                raise ResourceExhausted(f"delta {key.name}@{key.version} needs {staged.footprint} bytes of device "
                                        f"memory, more than delta_memory_bytes={self.budget}")
        except BaseException as exc:  # surfaced to the waiting requests by lookup
            with self._lock:
                self._loading.discard(key)
                self._load_errors += 1
                if key not in self._dropped:
                    self._errors[key] = (exc, self._steps)
                    for future in self._waiters.pop(key, []):
                        future.set_exception(exc)
                self._dropped.discard(key)
                self._start_loads()
            self._wake()
            return
        with self._lock:
            self._loading.discard(key)
            self._loads += 1
            self._load_seconds += time.perf_counter() - t0
            if key in self._dropped:
                self._dropped.discard(key)
            else:
                self._ready[key] = staged
                self._ready_bytes += staged.footprint
            self._start_loads()
        self._wake()

    def _wake(self) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def _install_ready(self, waiting_order: list[DeltaKey]) -> int:
        """Install ready loads (those waiting requests name first, in their order) up to INSTALL_BYTES_PER_STEP."""
        self._blocked = None
        waiting = set(waiting_order)
        order = [k for k in waiting_order if k in self._ready] + [k for k in self._ready if k not in waiting]
        batch: list[tuple[DeltaKey, int, StagedDelta]] = []
        planned = 0
        for key in order:
            staged = self._ready[key]
            if key in self._where:
                continue  # a deleted version still in use: its load waits for the old copy to go
            if batch and planned + staged.footprint > INSTALL_BYTES_PER_STEP:
                break
            if not self._make_room(staged.footprint, waiting, exclude={k for k, _, _ in batch}):
                if key in waiting and self._blocked is None:
                    self._blocked = key
                    self._ahead = set(waiting_order[:waiting_order.index(key)])
                continue
            del self._ready[key]
            self._ready_bytes -= staged.footprint
            batch.append((key, self._take_slot(), staged))
            self._held += staged.footprint
            self._real += staged.real_bytes
            planned += staged.footprint
        if not batch:
            return 0
        t0 = time.perf_counter()
        self.dm.ensure_slots(max(slot for _, slot, _ in batch) + 1)
        items = [(slot, staged) for _, slot, staged in batch]
        compacted = False
        while True:
            try:
                self.dm.install(items, room=self.budget - self.dm.capacity_bytes())
                break
            except NoRoom:
                if not compacted:  # free cells and slack of other arenas back first (once: a relayout copies)
                    compacted = True
                    self.dm.compact()
                    continue
                # arenas hold exactly their live cells and still do not fit: the footprints undercount the
                # slot tables' slack; evict one more unpinned delta (not one being installed) and retry
                victim = self._victim(waiting, exclude={k for k, _, _ in batch})
                if victim is None:
                    for key, slot, staged in batch:  # give the batch back: installs wait for the next step
                        self._unplan(key, slot, staged)
                    self._install_seconds += time.perf_counter() - t0
                    return 0
                self._evict(victim)
                compacted = False
        for key, slot, staged in batch:
            self._where[key] = slot
            self._lru[key] = None
            self._footprint[key] = (staged.footprint, staged.real_bytes)
            if staged.prompt is not None:
                self._installed.append((key, slot))
            for future in self._waiters.pop(key, []):
                future.set_result(slot)
        self._install_seconds += time.perf_counter() - t0
        return len(batch)

    def _unplan(self, key: DeltaKey, slot: int, staged: StagedDelta) -> None:
        self._ready[key] = staged
        self._ready_bytes += staged.footprint
        self._held -= staged.footprint
        self._real -= staged.real_bytes
        heapq.heappush(self._free_slots, slot)

    def _make_room(self, need: int, waiting: set[DeltaKey], exclude: set[DeltaKey]) -> bool:
        """Evict LRU unpinned deltas until ``need`` more bytes fit the budget with the slot tables at the
        capacity one more delta needs; False (nothing evicted) if the pinned deltas hold too much."""
        tables = self.dm.slot_bytes * self.dm.next_slot_capacity(len(self._where) + len(exclude) + 1)
        budget = self.budget - tables
        if self._held + need <= budget:
            return True
        evictable = sum(self._footprint[k][0] for k in self._lru if k not in self._pinned and k not in exclude)
        if self._held + need - evictable > budget:
            return False
        while self._held + need > budget:
            self._evict(self._victim(waiting, exclude))
        return True

    def _victim(self, waiting: set[DeltaKey], exclude: set[DeltaKey]) -> DeltaKey | None:
        """The least recently used unpinned resident delta, one that no waiting request names first."""
        fallback = None
        for key in self._lru:
            if key in self._pinned or key in exclude:
                continue
            if key not in waiting:
                return key
            fallback = fallback or key
        return fallback

    def _evict(self, key: DeltaKey, *, counted: bool = True) -> None:
        slot = self._where.pop(key)
        self._lru.pop(key, None)
        self._installed = [(k, s) for k, s in self._installed if k != key]
        self._doomed.discard(key)
        footprint, real = self._footprint.pop(key)
        self._held -= footprint
        self._real -= real
        self.dm.clear(slot)
        heapq.heappush(self._free_slots, slot)
        if counted:
            self._evictions += 1

    def _take_slot(self) -> int:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        self._next_slot += 1
        return self._next_slot - 1
