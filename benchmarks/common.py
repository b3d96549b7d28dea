"""Shared benchmark plumbing: timing, machine record, JSONL results and the summary line.

Conventions (``docs/DESIGN.md``, "Benchmark conventions"): fixed seeds, warm-up, several
repeats, medians; on CUDA every sample is synchronised and preceded by an L2 flush; one JSON line
per point in ``benchmarks/results/<script>-<YYYY-MM-DD>.jsonl`` (``BENCH_RESULTS_DIR`` overrides the
folder); the last printed line is ``summary: key=value ...``. Baselines run in the same process and
results are reported as ratios to them, because absolute times on shared 2-core machines drift by
tens of percent between runs (punica ``benchmarks/benchmark_utils.py``, Triton ``do_bench``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# HBM peak bandwidth, GB/s, by substring of torch.cuda.get_device_name (vendor datasheets).
PEAK_BANDWIDTH_GBS = {
    "H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H800": 3350.0,
    "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "A10G": 600.0, "A10": 600.0,
    "L40S": 864.0, "L40": 864.0, "L4": 300.0, "V100": 900.0, "T4": 320.0, "RTX 4090": 1008.0, "RTX 3090": 936.0,
}

_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock of the virtual-time engine benchmarks: wall time on CUDA (the device works while the CPU
    waits), this process's CPU time on the CPU (a shared 2-core box moves wall time by up to 2x)."""
    return time.perf_counter if torch.device(device).type == "cuda" else time.process_time


def timed_once(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    """Seconds one call of ``fn`` takes on ``clock``, the device synchronised on both sides."""
    sync(device)
    t0 = clock()
    fn()
    sync(device)
    return clock() - t0


def _flush_l2(device: torch.device) -> None:
    # 256 MB exceeds every current L2 (H100: 50 MB, H200: 60 MB), so no sample starts cache-warm.
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(64 << 20, dtype=torch.int32, device=device)
    buf.zero_()


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 2, repeats: int = 7,
            min_sample_s: float = 0.02, flush_l2: bool = True, clock: str | None = None) -> dict:
    """Median time of one call of ``fn`` in ms (see :func:`time_many`)."""
    return time_many({"fn": fn}, device=device, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s,
                     flush_l2=flush_l2, clock=clock)["fn"]


def time_many(fns: dict[str, Callable[[], object]], *, device: torch.device | str = "cpu", warmup: int = 2,
              repeats: int = 7, min_sample_s: float = 0.02, flush_l2: bool = True,
              clock: str | None = None) -> dict[str, dict]:
    """Median time of one call of each function in ms, sampled round-robin: one sample of every
    function per repetition, so a load spike from a neighbour on a shared machine hits every variant
    alike and their ratios hold (timed one after another they drifted by 2-30x here).

    CPU: each sample loops the function until it lasts >= ``min_sample_s`` (one 0.1 ms call is below
    the timer's noise on a shared VM), so weights stay cache-warm, as in a serving loop.
    ``clock`` (CPU): "wall" (perf_counter) or "thread" (CPU time of the calling thread, which a
    neighbour's load cannot inflate; only meaningful with ``torch.set_num_threads(1)``, since
    intra-op threads' time is not counted). Default: ``BENCH_CLOCK`` or "wall".
    CUDA: each sample is one call bracketed by events, after an L2 flush and a sync.
    """
    device = torch.device(device)
    clock = clock or os.environ.get("BENCH_CLOCK", "wall")
    if clock not in ("wall", "thread"):
        raise ValueError(f"time_many: clock {clock!r} is not 'wall' or 'thread'")
    now = time.perf_counter if clock == "wall" else time.thread_time
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    cuda = device.type == "cuda"
    inner = {}
    for name, fn in fns.items():
        if cuda:
            inner[name] = 1
            continue
        t0 = now()
        fn()
        inner[name] = max(1, int(min_sample_s / max(now() - t0, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                if flush_l2:
                    _flush_l2(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = now()
                for _ in range(inner[name]):
                    fn()
                samples[name].append((now() - t0) * 1e3 / inner[name])
    return {name: {"ms": statistics.median(v), "ms_min": min(v), "ms_max": max(v), "repeats": repeats,
                   "inner": inner[name], "clock": "cuda_events" if cuda else clock} for name, v in samples.items()}


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where and with what a point was measured."""
    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["peak_bandwidth_gbs"] = peak_bandwidth_gbs()
    return info


def peak_bandwidth_gbs(name: str | None = None) -> float | None:
    """Datasheet HBM bandwidth of the current (or named) GPU; None when unknown."""
    name = name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    for key, gbs in PEAK_BANDWIDTH_GBS.items():  # longest keys first in the table where names nest
        if key in name:
            return gbs
    return None


class Results:
    """Writes one JSON line per point and prints the final summary line."""

    def __init__(self, script: str, settings: dict | None = None, out_dir: str | Path | None = None):
        out = Path(out_dir or os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(script).stem
        self.path = out / f"{stem}-{_dt.date.today().isoformat()}.jsonl"
        self.machine = machine()
        self.settings = dict(settings or {})
        self.run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def write(self, point: dict) -> None:
        row = {"run": self.run_id, **point, "settings": self.settings, "machine": self.machine}
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=False, default=str) + "\n")

    def summary(self, **kv) -> str:
        line = "summary: " + " ".join(f"{k}={_fmt(v)}" for k, v in kv.items())
        print(line, flush=True)
        sys.stdout.flush()
        return line


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
