"""Per-step delta metadata, computed once from the per-token slot ids and shared by every layer
and every delta kind of the step (vLLM ``lora_kernel_metadata.py``, SGLang's chunked backend).

Running example: token_slots = [2, 2, -1, 0, 2, 0]  (T = 6, slot -1 = no delta)

    active_slots_host  = [0, 2]                 sorted; A = 2
    sorted_token_ids   = [3, 5, 0, 1, 4, 2]     tokens of slot 0, then slot 2, then the -1 tokens
    seg_start          = [0, 2, 5]              segment k = sorted_token_ids[seg_start[k]:seg_start[k+1]]
    seg_len            = [2, 3]
    runs_host          = [(0, 2, 2), (3, 4, 0), (4, 5, 2), (5, 6, 0)]   maximal same-slot runs in token order

Triton kernels walk the segments (grid = max segment length x active slots); the CPU backend
picks, per call, between contiguous runs (prefill: one run per sequence, no gather at all),
sorted segments, grouped matmuls over the pool and a gathered batched matmul (decode: one token per slot).

Storage. ``build(..., buffers=MetaBuffers(max_tokens, max_slots, device))`` writes the device index
tensors into storage allocated once and refilled with one ``copy_`` per step (as vLLM's
``LoRAKernelMeta.prepare_tensors``), so they keep their addresses from step to step and serving
allocates nothing for them; without ``buffers`` (tests, benchmarks) they are fresh tensors. The CPU
backend's derived indices (the cached properties below, its grouped plan's offsets) are built per step.

Capacity mode (CUDA graphs). By default the Triton launch grids are sized by this step's ``num_active``
and ``max_seg_len`` (host ints), which a captured graph would freeze. ``build(..., buffers=..., capacity=True)``
makes a meta whose launches are sized by capacity instead: ``grid_slots`` = the buffers' ``max_slots``
programs on the slot axis (vLLM: max_loras + 1 programs that exit on slot -1) and ``grid_tokens`` =
``num_tokens`` (the step's bucketed token count) on the segment axis; each program reads the step's number of
active slots from the device (``num_active_dev``, refilled with the other indices) and its segment's length
from ``seg_start``, and exits when it has nothing to do. So one captured launch serves every later step
that fits the same token count, whatever its slots: stale values in the buffers' unused tails are never
read. A capacity meta is never skipped on its host flags (``skippable``): a launch captured on a step with
no delta tokens must still run on a later step that has some.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

_WHOLE = object()  # DeltaKernelMeta.restrict's cache entry for "the set covers every active slot"


@dataclass(eq=False)
class DeltaKernelMeta:
    num_tokens: int
    no_delta: bool  # host flag: every token has slot -1, launchers return at once
    active_slots_host: list[int]  # sorted distinct slots >= 0
    seg_start_host: list[int]  # [A + 1]
    num_active_tokens: int  # tokens with a slot; == seg_start_host[-1]
    max_seg_len: int  # longest segment; sizes the kernels' M grid
    runs_host: list[tuple[int, int, int]]  # (start, end, slot) maximal runs of one slot in token order
    token_slots: torch.Tensor  # int32 [T] on the compute device
    sorted_token_ids: torch.Tensor  # int32 [T]
    active_slots: torch.Tensor  # int32 [A]
    seg_start: torch.Tensor  # int32 [A + 1]
    seg_len: torch.Tensor  # int32 [A]
    capacity_slots: int = 0  # > 0: a capacity meta (module docstring): slot-axis programs of every launch
    num_active_dev: torch.Tensor | None = None  # int32 [1] on the device: A, read by capacity launches
    capacity_index: tuple | None = None  # a capacity meta: the buffers' whole regions (MetaBuffers.regions)
    # What a backend decided for this step, kept with it (the CPU backend's bound ops: kernels.step_ops); a plain
    # dict read per wrapped module, where a weak-keyed table cost a weakref per lookup.
    memo: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def build(cls, token_slots: torch.Tensor, token_slots_host: list[int] | None = None, *,
              buffers: "MetaBuffers | None" = None, capacity: bool = False) -> "DeltaKernelMeta":
        """``token_slots``: int32 [T] on the compute device; ``token_slots_host``: the same values as a
        list, which saves a device->host sync when the caller already has them (the engine does);
        ``buffers``: preallocated storage for the index tensors (on ``token_slots``' device). A meta built
        into ``buffers`` is valid until the next build into the same buffers; ``capacity``: launches sized by
        ``buffers``' capacity, not by this step's counts (needs ``buffers``; module docstring)."""
        if capacity and buffers is None:
            raise ValueError("DeltaKernelMeta.build: capacity=True needs buffers (the launches read their counts "
                             "from the buffers' fixed addresses)")
        if not isinstance(token_slots, torch.Tensor) or token_slots.dim() != 1:
            raise ValueError(f"token_slots: expected a 1-D int32 tensor, got "
                             f"{getattr(token_slots, 'shape', type(token_slots).__name__)}")
        if token_slots.dtype != torch.int32:
            raise ValueError(f"token_slots: expected int32, got {token_slots.dtype} (shape {tuple(token_slots.shape)})")
        if token_slots_host is None:
            token_slots_host = token_slots.tolist()
        elif len(token_slots_host) != token_slots.numel():
            raise ValueError(f"token_slots_host: {len(token_slots_host)} entries for token_slots of shape "
                             f"{tuple(token_slots.shape)}")
        num_tokens = len(token_slots_host)
        if token_slots_host and min(token_slots_host) < -1:
            raise ValueError(f"token_slots: slot ids must be >= -1, got {min(token_slots_host)}")

        runs: list[tuple[int, int, int]] = []
        counts: dict[int, int] = {}
        start, prev = 0, None
        for i, s in enumerate(token_slots_host):  # one pass: runs and per-slot counts (T <= a few thousand)
            if s != prev:
                if prev is not None and prev >= 0:
                    runs.append((start, i, prev))
                start, prev = i, s
            if s >= 0:
                counts[s] = counts.get(s, 0) + 1
        if prev is not None and prev >= 0:
            runs.append((start, num_tokens, prev))

        active = sorted(counts)
        seg_start = [0]
        for s in active:
            seg_start.append(seg_start[-1] + counts[s])
        num_active_tokens = seg_start[-1]

        host = torch.tensor(token_slots_host, dtype=torch.int32)  # [T]
        if len(runs) == len(active):  # every slot is one run (prefill, or identical): order is a concatenation
            order = [i for a, b, _ in sorted(runs, key=lambda r: r[2]) for i in range(a, b)]
            order += [i for i, s in enumerate(token_slots_host) if s < 0]
            sorted_ids = torch.tensor(order, dtype=torch.int32)
        else:  # stable sort with the -1 tokens last
            key = torch.where(host < 0, torch.iinfo(torch.int32).max, host)
            sorted_ids = torch.argsort(key, stable=True).to(torch.int32)
        seg_len = [seg_start[k + 1] - seg_start[k] for k in range(len(active))]
        n_act = len(active)
        count = None
        if buffers is not None:
            views = buffers.fill(sorted_ids, active, seg_start, seg_len, token_slots.device, count=capacity)
            count = buffers.num_active if capacity else None
        else:  # one host->device copy for all index tensors: [T | A | A+1 | A]
            packed = torch.cat([sorted_ids, torch.tensor(active + seg_start + seg_len, dtype=torch.int32)])
            packed = packed.to(token_slots.device)
            views = (packed[:num_tokens], packed[num_tokens:num_tokens + n_act],
                     packed[num_tokens + n_act:num_tokens + 2 * n_act + 1], packed[num_tokens + 2 * n_act + 1:])
        return cls(
            num_tokens=num_tokens,
            no_delta=num_active_tokens == 0,
            active_slots_host=active,
            seg_start_host=seg_start,
            num_active_tokens=num_active_tokens,
            max_seg_len=max(seg_len, default=0),
            runs_host=runs,
            token_slots=token_slots,
            sorted_token_ids=views[0],
            active_slots=views[1],
            seg_start=views[2],
            seg_len=views[3],
            capacity_slots=buffers.max_slots if capacity else 0,
            num_active_dev=count,
            capacity_index=buffers.regions if capacity else None,
        )

    @property
    def num_active(self) -> int:
        return len(self.active_slots_host)

    @cached_property
    def active_key(self) -> tuple[int, ...]:
        """The active slots as a tuple: what callers key per-set decisions on (equal across steps with one set)."""
        return tuple(self.active_slots_host)

    @property
    def capacity(self) -> bool:
        return self.capacity_slots > 0

    @property
    def skippable(self) -> bool:
        """A launcher may return at once: no token has a delta and this is not a capacity meta."""
        return self.no_delta and not self.capacity_slots

    @property
    def launch_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted_token_ids, active_slots, seg_start) as the segment-walking launches read them: for a capacity
        meta the buffers' whole regions, whose addresses a captured launch keeps even when this step's views
        are empty (no active slot)."""
        if self.capacity_index is not None:
            return self.capacity_index
        return self.sorted_token_ids, self.active_slots, self.seg_start

    @property
    def grid_tokens(self) -> int:
        """Extent of the launches' segment axis: the longest segment, or every token for a capacity meta."""
        return self.num_tokens if self.capacity_slots else self.max_seg_len

    @property
    def grid_slots(self) -> int:
        """Extent of the launches' slot axis: this step's active slots, or the capacity."""
        return self.capacity_slots or self.num_active

    @property
    def all_tokens_active(self) -> bool:
        return self.num_active_tokens == self.num_tokens

    def restrict(self, slots: frozenset[int]) -> "DeltaKernelMeta":
        """This step's meta with only the tokens of ``slots`` active; every other token as slot -1, so an op
        leaves it alone. ``self`` when ``slots`` covers every active slot; otherwise built on first use and kept
        here, so every layer of the step asking for the same set shares one (a layer's BitFit rows, say, of 3
        of the step's 32 deltas: the bias add then touches those tokens, not 29 slots' zero rows)."""
        cache = self.__dict__.setdefault("_restricted", {})
        hit = cache.get(slots)  # before the scan below: every layer after the first asks for a set it already has
        if hit is _WHOLE:
            return self
        if hit is None:
            if all(s in slots for s in self.active_slots_host):
                cache[slots] = _WHOLE  # not self: no reference cycle keeping the step's meta alive
                return self
            host = [-1] * self.num_tokens
            for a, b, s in self.runs_host:
                if s in slots:
                    host[a:b] = [s] * (b - a)
            hit = cache[slots] = DeltaKernelMeta.build(
                torch.tensor(host, dtype=torch.int32).to(self.token_slots.device), host)
        return hit

    # Index tensors the CPU backend needs, built on first use and shared by every layer of the step.
    @cached_property
    def shortest_run(self) -> int:
        """Tokens of the shortest same-slot run (0 with no run): the CPU backend's native plan takes a step with
        any run shorter than ``kernels.cpu.looped.LONG_RUN``."""
        return min((b - a for a, b, _ in self.runs_host), default=0)

    @cached_property
    def active_token_ids(self) -> torch.Tensor:
        """int64 [N]: tokens that have a slot, in token order (N = num_active_tokens)."""
        return torch.nonzero(self.token_slots >= 0).flatten()

    @cached_property
    def active_token_slots(self) -> torch.Tensor:
        """int64 [N]: the slot of each token of :attr:`active_token_ids`."""
        if self.all_tokens_active:
            return self.token_slots.long()
        return self.token_slots.long().index_select(0, self.active_token_ids)

    @cached_property
    def padded_positions(self) -> torch.Tensor:
        """int64 [N]: row of each sorted active token when every segment is padded to max_seg_len
        (segment k, offset j -> k * max_seg_len + j)."""
        seg = self.max_seg_len
        pos = [k * seg + j for k in range(self.num_active)
               for j in range(self.seg_start_host[k + 1] - self.seg_start_host[k])]
        return torch.tensor(pos, dtype=torch.int64, device=self.token_slots.device)

    @cached_property
    def sorted_active_ids(self) -> torch.Tensor:
        """int64 [N]: tokens that have a slot, grouped by slot (the first N of sorted_token_ids)."""
        return self.sorted_token_ids[:self.num_active_tokens].long()


class MetaBuffers:
    """Storage for a step's index tensors, allocated once: ``sorted_token_ids`` [max_tokens],
    ``active_slots`` [max_slots], ``seg_start`` [max_slots + 1], ``seg_len`` [max_slots] and ``num_active``
    [1] (the step's number of active slots, which capacity launches read) as fixed regions of one int32
    device tensor, staged in one host tensor of the same size (written in place on a CPU device), so a step
    costs one host->device copy of (max_tokens + 3 * max_slots + 2) * 4 bytes (16.8 KB for 4096 tokens,
    32 slots) and no device allocation. The regions' unused tails hold stale values that no view covers
    and no launch reads."""

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device | str = "cpu"):
        if int(max_tokens) < 1 or int(max_slots) < 1:
            raise ValueError(f"MetaBuffers: max_tokens ({max_tokens}) and max_slots ({max_slots}) must be >= 1")
        self.max_tokens, self.max_slots = int(max_tokens), int(max_slots)
        size = self.max_tokens + 3 * self.max_slots + 2
        self.storage = torch.zeros(size, dtype=torch.int32, device=device)  # [size] on the device
        self.device = self.storage.device  # "cuda" resolved to "cuda:0", as token_slots' device reads
        self._staging = torch.zeros(size if self.device.type != "cpu" else 0, dtype=torch.int32)  # [size] host
        t, s = self.max_tokens, self.max_slots
        self._offsets = (0, t, t + s, t + 2 * s + 1)  # sorted_token_ids, active_slots, seg_start, seg_len
        self._o_count = t + 3 * s + 1
        self.num_active = self.storage[self._o_count:self._o_count + 1]  # int32 [1] on the device
        st = self.storage  # whole regions [max_tokens], [max_slots], [max_slots + 1]: what capacity launches read
        self.regions = (st[:t], st[t:t + s], st[t + s:t + 2 * s + 1])

    def fill(self, sorted_ids: torch.Tensor, active: list[int], seg_start: list[int], seg_len: list[int],
             device: torch.device, *, count: bool = False) -> tuple[torch.Tensor, ...]:
        """Stage the step's indices, copy them to the device once, return the four views; ``count``: also the
        number of active slots (a capacity meta's launches read it; ~10 us of host work the eager path skips)."""
        num_tokens, n_act = sorted_ids.numel(), len(active)
        if num_tokens > self.max_tokens:
            raise ValueError(f"MetaBuffers: {num_tokens} tokens exceed max_tokens={self.max_tokens}")
        if n_act > self.max_slots:
            raise ValueError(f"MetaBuffers: {n_act} active slots exceed max_slots={self.max_slots}")
        if device != self.device:
            raise ValueError(f"MetaBuffers: buffers on {self.device}, token_slots on {device}")
        o_ids, o_act, o_start, o_len = self._offsets
        small = torch.tensor(active + seg_start + seg_len, dtype=torch.int32)  # [A | A+1 | A]
        on_host = self.device.type == "cpu"
        dst = self.storage if on_host else self._staging  # a CPU device needs no staging copy
        dst[o_ids:o_ids + num_tokens].copy_(sorted_ids)
        dst[o_act:o_act + n_act].copy_(small[:n_act])
        dst[o_start:o_start + n_act + 1].copy_(small[n_act:2 * n_act + 1])
        dst[o_len:o_len + n_act].copy_(small[2 * n_act + 1:])
        if count:
            dst[self._o_count] = n_act
        if not on_host:
            self.storage.copy_(self._staging)  # blocking: the staging tensor is rewritten next step
        st = self.storage
        return (st[o_ids:o_ids + num_tokens], st[o_act:o_act + n_act], st[o_start:o_start + n_act + 1],
                st[o_len:o_len + n_act])
