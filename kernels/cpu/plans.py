"""Which of the CPU backend's six execution plans a call takes, chosen per call from the step metadata
(``kernels/cpu/__init__.py`` describes the plans and what each costs)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..meta import DeltaKernelMeta
from . import grouped
from .looped import LONG_RUN

PLANS = ("runs", "segments", "padded", "gather", "grouped", "strided", "native")

RUN_MIN_TOKENS = 4
"""Average run (or segment) length from which per-run matmuls beat the gathered bmm: one run costs
~15 us of launches on 2 cores, one gathered token ~5 us at in=out=1024, r=16."""

FEW_RUNS = 3
"""Up to this many same-slot runs the runs plan wins whatever their length: the grouped plan's fixed cost
(token groups, offsets, two grouped_mm) is ~120 us against ~35 us a run (rank 8, 576 -> 576, one thread: 1 run
69 vs 120 us, 3 runs 127 vs 150, 4 runs 157 vs 170, 8 runs 290 vs 217). Decode of one or a few requests on a
delta (the 30-layer one-request point of bench_engine) is this case at every wrapped module. Against the strided
plan the crossover is the same (1024 -> 1024, rank 16, loaded machine: 2 runs 91-105 vs 107-119 us, 3 runs 74-142
vs 67-128, 4 runs 156-184 vs 146-154)."""

PAD_MAX_WASTE = 2
"""padded plan: used while padding every slot's segment to the longest at most doubles the rows."""

GROUPED_CPU_FP32 = grouped.supported(torch.empty(0))
"""Whether ``F.grouped_mm`` runs here on CPU fp32 (probed once at import): the default of ``choose_plan``."""

STRIDED_MAX_SEG = 8
"""The strided plan (``strided.py``) while no active slot has more than this many tokens (decode: one or a few
requests per delta); past it the grouped plan. Measured, q_proj 1024 -> 1024, rank 16, one thread, loaded
2-core machine, strided / grouped: 32 slots x 1 token 0.38 / 0.64 ms; 32 x 8 tokens interleaved 1.49 / 1.91;
8 x 8 0.35 / 0.41; zipf popularity, 32 tokens on 8 slots (14 on the hottest) 0.42 / 0.37, 256 tokens on 32 slots
(82) 2.21 / 1.90: uneven counts pad the cells' token rows, grouped_mm takes each group's own count."""

_forced: list[str] = []


@contextmanager
def force_plan(plan: str):
    """Use ``plan`` for every call inside the block (tests cover each plan on the same inputs; the
    benchmark times them against each other to set RUN_MIN_TOKENS). "padded" and "grouped" fall back to
    "gather" where they cannot run (several rank groups; no grouped_mm for the device or dtype), "native" to
    "strided" (not fp32 on the CPU, or no C compiler here: ``looped.usable``); "strided" runs everywhere (torch.bmm
    on any layout, dtype and device)."""
    if plan not in PLANS:
        raise ValueError(f"force_plan: {plan!r} is not one of {', '.join(PLANS)}")
    _forced.append(plan)
    try:
        yield
    finally:
        _forced.pop()


def plan_forced() -> bool:
    """Whether a ``force_plan`` block is active (the ops' few-runs fast path then defers to ``choose_plan``)."""
    return bool(_forced)


def choose_plan(meta: DeltaKernelMeta, *, padded_ok=False, grouped_ok: bool | None = None,
                dtype: torch.dtype = torch.float32, native_ok=False) -> str:
    """The plan for this call. ``padded_ok``: the active slots form one rank group (``gather.groups``), a bool
    or a callable asked only when the choice gets that far (it costs a pass over the slots);
    ``grouped_ok``: whether the grouped plan can run on the call's tensors (``grouped.lora_ok``; None:
    whether it runs on CPU fp32), a bool or a callable asked only when the choice gets that far; it is picked
    unforced only for ``grouped.PREFERRED_DTYPES``, as is the strided plan (``STRIDED_MAX_SEG``); ``native_ok``:
    whether the native loops can run on the call's tensors (``looped.usable``), a bool or a callable, asked first
    for fp32 steps with a run shorter than ``looped.LONG_RUN`` (decode, or decode beside prefill chunks)."""
    if grouped_ok is None:
        grouped_ok = GROUPED_CPU_FP32
    if _forced:
        forced = _forced[-1]
        if (forced == "padded" and not _ask(padded_ok)) or (forced == "grouped" and not _ask(grouped_ok)):
            return "gather"
        if forced == "native" and not _ask(native_ok):
            return "strided"
        return forced
    n = meta.num_active_tokens
    if dtype in grouped.PREFERRED_DTYPES and meta.shortest_run < LONG_RUN and _ask(native_ok):
        return "native"  # decode tokens, alone or beside prefill chunks (those take matmuls within the plan)
    if len(meta.runs_host) <= FEW_RUNS or len(meta.runs_host) * RUN_MIN_TOKENS <= n:
        return "runs"
    if dtype in grouped.PREFERRED_DTYPES and meta.max_seg_len <= STRIDED_MAX_SEG:
        return "strided"
    if dtype in grouped.PREFERRED_DTYPES and _ask(grouped_ok):
        return "grouped"
    if meta.num_active * meta.max_seg_len <= PAD_MAX_WASTE * n and _ask(padded_ok):
        return "padded"
    if meta.num_active * RUN_MIN_TOKENS <= n:
        return "segments"
    return "gather"


def _ask(flag) -> bool:
    return bool(flag() if callable(flag) else flag)
