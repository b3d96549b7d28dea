"""One request's life inside the engine: its tokens, its KV block table, its delta slot and its timings.

Pure Python (no torch) so the scheduler that moves sequences around stays testable without a model.
A sequence lives in *cache slots*: ``num_virtual`` slots of its delta's prompt part first (0 without
one; shared blocks, see ``prefix_cache.py``), then its ``prompt + output`` tokens; ``num_computed`` slots
have K/V in the paged cache. Slot ``s >= num_virtual`` holds token ``s - num_virtual``, at position id
``s - num_virtual + position_offset`` (the producing library's: PEFT and soft prompts put the first real
token at N, AdapterHub and OpenDelta prefixes at 0). Preemption by recompute (vLLM's RECOMPUTE mode) resets
``num_computed`` to 0 and drops the block references: the next admission takes what is still cached and
recomputes the rest, which costs FLOPs but no host copy of the cache.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from delta_store.records import DeltaKey

from ..types import GenerationRequest, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # in its tenant's queue (new, or preempted and waiting to recompute)
    RUNNING = "running"  # admitted: holds KV blocks and (if it has a delta) a pinned slot
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request: GenerationRequest
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # cache slots whose K/V are in the cache (virtual slots included)
    block_table: list[int] = field(default_factory=list)  # physical KV block ids, in slot order (some shared)
    num_virtual: int = 0  # slots of the delta's prompt part in front of the tokens; set at admission
    position_offset: int = 0  # position id of the first real token (num_virtual or 0)
    block_hashes: list[bytes] = field(default_factory=list)  # content key of each full block, in order
    pinned_blocks: list[int] = field(default_factory=list)  # referenced outside the table: the prefix's tail
    slot: int | None = None  # device delta slot pinned while running; None = no delta or not admitted
    waited_on_delta: bool = False  # skipped at admission at least once because its delta was not resident
    admit_order: int = 0  # increasing admission counter; the newest is preempted first
    num_preemptions: int = 0
    finish_reason: str | None = None
    # timings (time.monotonic seconds)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # step counters, for fairness tests and queue-wait in steps
    arrival_step: int = 0
    first_token_step: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def delta(self) -> DeltaKey | None:
        return self.request.delta

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        """Cache slots of the whole sequence: virtual + prompt + output (what max_model_len bounds)."""
        return self.num_virtual + len(self.request.prompt_token_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids of slots [start, end) (never virtual ones) without building the concatenation."""
        assert start >= self.num_virtual, f"slot {start} is a virtual token of the delta's prompt part"
        start, end = start - self.num_virtual, end - self.num_virtual
        prompt = self.request.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return prompt[start:] + self.output_ids[:end - n]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
