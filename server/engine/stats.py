"""Plain stats the engine emits; the metrics module (server/metrics.py) turns them into Prometheus series.

The engine never imports prometheus_client (vLLM ``v1/metrics/loggers.py`` splits it the same way): it calls
every listener with a :class:`StepStats` after each step and a :class:`RequestStats` when a request ends.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepStats:
    step: int
    step_time: float  # seconds, schedule -> emit
    forward_time: float  # seconds in the model runner (forward + sampling)
    num_tokens: int  # packed tokens this step (prefill + decode)
    prefill_tokens: int
    decode_tokens: int
    num_seqs: int  # sequences (chunks) in the batch
    num_deltas: int  # distinct delta slots in the batch (base excluded)
    num_running: int
    num_waiting: int
    waiting_on_delta: int  # waiting requests whose delta is still loading / has no slot
    num_preempted: int  # sequences preempted by this step
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int = 0  # idle blocks kept for their content (prefix cache), evictable
    # running totals of the prefix cache (server/engine/prefix_cache.py), turned into counters by metrics
    prefix_lookups: int = 0  # full token blocks looked up
    prefix_hits: int = 0  # ... found cached: their prefill was skipped
    prefix_evictions: int = 0  # cached blocks reclaimed for new content
    prompt_prefixes: int = 0  # delta prompt prefixes computed (first use of a version, or after eviction)


@dataclass(slots=True)
class RequestStats:
    request_id: str
    tenant: str
    has_delta: bool  # False: the base model alone
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_time: float  # arrival -> first scheduled (seconds)
    ttft: float | None  # arrival -> first token
    tpot: float | None  # mean time per output token after the first
    e2e: float  # arrival -> finish
    num_preemptions: int
