"""Cases for the kernel tests and ``benchmarks/bench_kernels.py``: slot maps from popularity patterns and
random slot pools whose padding holds garbage. The oracle they are checked against is the exact
reference, ``kernels/reference.py``."""
from __future__ import annotations

from contextlib import contextmanager

import torch

import kernels
from tests.helpers import popularity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the Triton cases run: CUDA when present, else the CPU under TRITON_INTERPRET=1."""
BACKENDS = ("cpu", "triton")
RANKS = (1, 4, 8, 16, 64)
PATTERNS = ("identical", "distinct", "uniform", "zipf", "skewed")
ACT_NAMES = ("relu", "gelu", "gelu_new", "silu")
GARBAGE = 1e3
"""Written into pool padding (past a slot's rank or width): a kernel that reads past it fails loudly."""
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
"""fp32 op against the float64 reference at the test sizes (in, out <= 72, ranks <= 64)."""


@contextmanager
def on(backend: str):
    """Run the public ops (``kernels.add_lora`` ...) on ``backend`` inside the block."""
    with kernels.backend(backend):
        yield


def slot_ids(num_tokens: int, num_deltas: int, kind: str, *, pool_slots: int | None = None, seed: int = 0,
             none_fraction: float = 0.0) -> list[int]:
    """Per-token slot ids (-1 = none): ``popularity`` indices mapped onto a random subset of the
    ``pool_slots`` slot ids, so active slots are neither 0..n-1 nor contiguous."""
    pool_slots = pool_slots or num_deltas + 2
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randperm(pool_slots, generator=g)[:num_deltas].tolist()
    return [-1 if k < 0 else ids[k] for k in popularity(num_tokens, num_deltas, kind, seed=seed,
                                                        none_fraction=none_fraction)]


def slots_tensor(slots: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int32, device=device)


def _pad_garbage(pool: torch.Tensor, sizes: list[int], dim: int) -> None:
    for s, n in enumerate(sizes):
        pool[s].narrow(dim - 1, n, pool.shape[dim] - n).fill_(GARBAGE)


def transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape [S, a, b], stored as a contiguous [S, b, a] (the faster up-pool layout)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def lora_pools(num_slots: int, n_in: int, n_out: int, ranks: list[int], *, max_rank: int = 64,
               dtype=torch.float32, device="cpu", seed: int = 0, b_transposed: bool = False) -> dict:
    """lora_a [S, R, in], lora_b [S, out, R], scale fp32 [S], rank int32 [S]; padding holds GARBAGE.
    ``b_transposed``: lora_b stored as [S, R, out] (a transpose view, as the kernels accept)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_slots, max_rank, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(num_slots, n_out, max_rank, generator=g) / 4
    _pad_garbage(a, ranks, 1)
    _pad_garbage(b, ranks, 2)
    b = b.to(device, dtype)
    return dict(lora_a=a.to(device, dtype), lora_b=transposed_storage(b) if b_transposed else b,
                scale=(0.5 + torch.rand(num_slots, generator=g)).to(device),
                rank=torch.tensor(ranks, dtype=torch.int32, device=device))


def bottleneck_pools(num_slots: int, hidden: int, widths: list[int], acts: list[int], *, max_width: int = 32,
                     dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """down [S, M, h], down_bias [S, M], up [S, h, M], up_bias [S, h], scale, width, act; padding = GARBAGE."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(num_slots, max_width, hidden, generator=g) / hidden ** 0.5
    down_bias = torch.randn(num_slots, max_width, generator=g) / 4
    up = torch.randn(num_slots, hidden, max_width, generator=g) / 4
    up_bias = torch.randn(num_slots, hidden, generator=g) / 4
    _pad_garbage(down, widths, 1)
    _pad_garbage(down_bias, widths, 1)
    _pad_garbage(up, widths, 2)
    return dict(down=down.to(device, dtype), down_bias=down_bias.to(device, dtype), up=up.to(device, dtype),
                up_bias=up_bias.to(device, dtype), scale=(0.5 + torch.rand(num_slots, generator=g)).to(device),
                width=torch.tensor(widths, dtype=torch.int32, device=device),
                act=torch.tensor(acts, dtype=torch.int32, device=device))
