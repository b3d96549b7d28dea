"""Helpers shared by the torch reference plans (``reference.py``, ``reference_grouped.py``): scratch
buffers, fp32 views, the row add back into ``y`` and the activation table of the bottleneck op."""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

ACT_FNS = {
    0: torch.relu,
    1: lambda h: F.gelu(h, approximate="none"),
    2: lambda h: F.gelu(h, approximate="tanh"),
    3: F.silu,
}
"""Activation per code of ``kernels.ACT_CODES`` (relu, gelu, gelu_new, silu)."""


class Workspace(threading.local):
    """Grow-only scratch buffers per (name, device, dtype). Fresh multi-MB tensors per call cost
    page faults: the gathered LoRA path takes 0.65x of the base matmul with fresh tensors and 0.25x
    with reused ones (BASELINES-CPU.md §3, T=32). Thread-local, so concurrent forwards never share."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        need = 1
        for d in shape:
            need *= d
        key = (name, device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < need:
            buf = torch.empty(max(need, 1), dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:need].view(shape)


WS = Workspace()


def f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def add_rows(y: torch.Tensor, ids: torch.Tensor | None, d: torch.Tensor) -> None:
    """y[ids] += d (``d`` [N, out], fp32 or y's dtype); ``ids`` None means every token in token order."""
    if ids is None:
        if y.dtype == torch.float32 or y.dtype == d.dtype:
            y.add_(d)
        else:
            y.copy_(y.float().add_(d))
    elif y.dtype == d.dtype:
        y.index_add_(0, ids, d)
    else:
        y.index_copy_(0, ids, y.index_select(0, ids).float().add_(d).to(y.dtype))


def apply_act(h: torch.Tensor, codes: list[int], tok_act: torch.Tensor | None) -> torch.Tensor:
    """act_s(h) per row: ``codes`` the distinct activation codes present, ``tok_act`` int [n] the code of
    each row (needed only when more than one code is present)."""
    if len(codes) == 1:
        return ACT_FNS[codes[0]](h)
    mixed = torch.empty_like(h)
    for c in codes:  # at most 4 activations; usually one
        rows = tok_act == c
        mixed[rows] = ACT_FNS[c](h[rows])
    return mixed


class _OneThread:
    """Process-wide "run on one intra-op thread" section, re-entrant across Python threads: the first to
    enter saves torch's thread count, the last to leave restores it (0.3 us per switch)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = 1

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.saved = torch.get_num_threads()
                if self.saved != 1:
                    torch.set_num_threads(1)
            self.depth += 1

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0 and self.saved != 1:
                torch.set_num_threads(self.saved)


_ONE_THREAD = _OneThread()


def one_thread(op):
    """Run a delta op on CPU tensors with one intra-op thread. Its tensors are small (rank- or width-sized
    matmuls, row gathers and adds of at most max_batch_tokens rows) and each is an OpenMP parallel region
    with a barrier; with 2 threads on 2 busy cores every barrier waits for a descheduled thread. Measured on
    the CPU benchmark Llama (hidden 1024, 4 layers, 32 mixed deltas, 48 prompts of 8-192 tokens, 2 threads,
    ``/tmp`` reproduction of bench_serving): index_add_ 1.89 s -> 0.09 s and grouped_mm 1.89 s -> 0.68 s
    per run, step time 11.3 s -> 9.2 s; uncontended, 2 threads gain < 10% on these shapes (grouped LoRA,
    T=2048 on 16 slots, 1024 -> 2816: 5.2 vs 5.6 ms), while the base matmuls keep both threads."""

    @functools.wraps(op)
    def run(y: torch.Tensor, *args, **kwargs):
        if y.device.type != "cpu":
            return op(y, *args, **kwargs)
        with _ONE_THREAD:
            return op(y, *args, **kwargs)

    return run
