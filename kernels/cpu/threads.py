"""How many intra-op threads the CPU backend's delta ops run on: a setting of this backend, default 1.

torch has one intra-op thread count for the process (``torch.set_num_threads``). The base model's
matmuls want all of it; the delta ops do not. Their tensors are small (rank- or width-sized matmuls,
row gathers and adds of at most the step's token budget of rows) and each is an OpenMP parallel region
ending in a barrier; with 2 threads on 2 busy cores every barrier waits for a descheduled thread.
Measured on the CPU benchmark Llama (hidden 1024, 4 layers, 32 mixed deltas, 48 prompts of 8-192
tokens, 2 threads, a reproduction of bench_serving): ``index_add_`` 1.89 s -> 0.09 s and ``grouped_mm``
1.89 s -> 0.68 s per run, step time 11.3 s -> 9.2 s with the delta ops on one thread; uncontended, two
threads gain < 10% on these shapes (grouped LoRA, T=2048 on 16 slots, 1024 -> 2816: 5.2 vs 5.6 ms).

So each CPU delta op lowers torch's thread count to ``op_threads()`` (``OP_THREADS_DEFAULT`` = 1) when it
starts and gives the count back when it ends, while the base matmuls between them keep the process's
count. The section is re-entrant across Python threads (the first op in saves the count, the last out
restores it; 0.3 us a switch). ``set_op_threads(n)`` picks another count; ``set_op_threads(None)`` runs
the ops on whatever the process's count is, with no switching. Ops on other devices are not affected.
"""
from __future__ import annotations

import functools
import threading

import torch

OP_THREADS_DEFAULT = 1
"""Intra-op threads of a CPU delta op unless ``set_op_threads`` says otherwise (reason: module docstring)."""

_op_threads: int | None = OP_THREADS_DEFAULT


def set_op_threads(n: int | None) -> None:
    """Run every CPU delta op on ``n`` intra-op threads (n >= 1), or on the process's count (None)."""
    global _op_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"set_op_threads: expected an int >= 1 or None, got {n!r}")
    _op_threads = n


def op_threads() -> int | None:
    """The current setting: intra-op threads of a CPU delta op, None = the process's count."""
    return _op_threads


class _Section:
    """The process-wide "run on op_threads() threads" section, re-entrant across Python threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: int | None = None  # the count to give back when the outermost op ends; None: unchanged

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                want, have = _op_threads, torch.get_num_threads()
                self.saved = have if want is not None and want != have else None
                if self.saved is not None:
                    torch.set_num_threads(want)
            self.depth += 1

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0 and self.saved is not None:
                torch.set_num_threads(self.saved)
                self.saved = None


_SECTION = _Section()


def on_op_threads(op):
    """Decorate a CPU-backend op whose first argument is the tensor it writes: on CPU tensors it runs
    inside the section above; on any other device, or with the setting None, it just runs."""

    @functools.wraps(op)
    def run(y: torch.Tensor, *args, **kwargs):
        if y.device.type != "cpu" or _op_threads is None:
            return op(y, *args, **kwargs)
        if _SECTION.depth == 0 and torch.get_num_threads() == _op_threads:
            return op(y, *args, **kwargs)  # nothing to switch (a one-thread process): skip the lock, 5-7 us a call
        with _SECTION:
            return op(y, *args, **kwargs)

    return run
