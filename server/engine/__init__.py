"""The engine: continuous batching over the unchanged HF forward (D6).

    engine.py        Engine: async API (add_request / stream / abort) + the step loop on a worker thread
    scheduler.py     Scheduler: token budget, fair admission across tenants, delta residency per step
    sequence.py      Sequence: one request's tokens, KV blocks and state
    model_runner.py  ModelRunner: packed batch -> HF forward with logits_to_keep -> sampled tokens
    attention.py     PagedCache + the paged attention function registered with transformers
    kv_cache.py      KVCache: the paged K/V pools of every layer
    block_pool.py    BlockPool: refcounted block ids, idle cached blocks in an LRU
    prefix_cache.py  PrefixCache: shared KV prefixes of prompt deltas, automatic prefix caching (D14)
    sampling.py      per-row sampling (seeded, top-k/top-p, repetition penalty)
    detokenizer.py   IncrementalDetokenizer: streamed text that never splits a character
    tokenizer.py     the byte-level tokenizer of the demo model
    stats.py         RequestStats, StepStats: what the engine reports to server/metrics.py

``Engine`` and ``ModelRunner`` are re-exported lazily: ``import server.engine.stats`` (metrics) costs 0.06 s,
while the engine module pulls in transformers (about 6 s on these machines).
"""
from __future__ import annotations

import importlib

_LAZY = {"Engine": ".engine", "ModelRunner": ".model_runner"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
