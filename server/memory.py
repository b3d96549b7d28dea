"""Memory budgets of the serving process: how many bytes deltas and the KV cache may use on the device (D13).

Both are byte budgets resolved once at start-up, after the weights are loaded, from ``ServerConfig``::

    free   = device memory free after the weights (CUDA: torch.cuda.mem_get_info; CPU: MemAvailable)
    deltas = delta_memory_bytes or delta_memory_fraction * free
    kv     = kv_blocks * block bytes, or kv_memory_bytes, or kv_memory_fraction * free
    deltas + kv <= free, else start-up fails with one line naming the budgets and the memory available

Fraction 0 means the device default: on CUDA 0.10 of free for deltas and 0.60 for the KV cache (the other
0.30 holds a step's activations); on the CPU 0.25 of free (at most 4 GiB) for deltas and 1 GiB (at most a
quarter of free) for the KV cache. Neither budget is touched at start-up: the KV cache is allocated
uninitialised (``torch.empty``: on the CPU its pages are mapped when first written) and delta arenas appear
with the first delta (``server/deltas/pages.py``), so the process's resident memory grows with use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import ConfigError, ServerConfig

CUDA_DELTA_FRACTION = 0.10
CUDA_KV_FRACTION = 0.60
CPU_DELTA_FRACTION = 0.25
CPU_DELTA_MAX = 4 << 30
CPU_KV_BYTES = 1 << 30
CPU_KV_FRACTION_MAX = 0.25


@dataclass(frozen=True, slots=True)
class Budgets:
    delta_bytes: int
    kv_bytes: int  # 0 when kv_blocks sets the cache size instead
    free_bytes: int  # device memory free after the weights, when resolved
    device: str


def free_memory(device: torch.device) -> int:
    """Bytes the device has free now (CUDA: the driver's count; CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve(config: ServerConfig, device: torch.device, *, kv_block_bytes: int = 0,
            free_bytes: int | None = None) -> Budgets:
    """The two budgets for ``config`` on ``device`` (call after loading the weights). ``kv_block_bytes``: bytes
    of one KV block (to count an explicit ``kv_blocks``); ``free_bytes`` overrides the probe (tests). Raises
    ConfigError, one line, when explicit budgets do not fit the memory free."""
    free = free_memory(device) if free_bytes is None else int(free_bytes)
    cuda = device.type == "cuda"
    if config.delta_memory_bytes:
        delta = config.delta_memory_bytes
    elif config.delta_memory_fraction:
        delta = int(config.delta_memory_fraction * free)
    else:
        delta = int(CUDA_DELTA_FRACTION * free) if cuda else min(CPU_DELTA_MAX, int(CPU_DELTA_FRACTION * free))
    if config.kv_blocks:
        kv, kv_what = config.kv_blocks * kv_block_bytes, f"kv_blocks={config.kv_blocks} ({config.kv_blocks * kv_block_bytes} bytes)"
    elif config.kv_memory_bytes:
        kv, kv_what = config.kv_memory_bytes, f"kv_memory_bytes={config.kv_memory_bytes}"
    elif config.kv_memory_fraction:
        kv, kv_what = int(config.kv_memory_fraction * free), f"kv_memory_fraction={config.kv_memory_fraction}"
    else:
        kv = int(CUDA_KV_FRACTION * free) if cuda else min(CPU_KV_BYTES, int(CPU_KV_FRACTION_MAX * free))
        kv_what = f"the default KV cache ({kv} bytes)"
    delta_what = (f"delta_memory_bytes={delta}" if config.delta_memory_bytes else f"the delta budget ({delta} bytes)")
    if delta < 1:
        raise ConfigError(f"{delta_what}: no memory left for deltas on {device} ({free} bytes free after the weights)")
    if delta + kv > free:
        raise ConfigError(f"{delta_what} + {kv_what} = {delta + kv} bytes exceed the {free} bytes free on {device} "
                          f"after loading the weights; lower them or use fractions")
    return Budgets(delta, 0 if config.kv_blocks else kv, free, str(device))
