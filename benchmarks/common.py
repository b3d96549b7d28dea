"""Shared benchmark plumbing: timing, machine record, JSONL results and the summary line.

Conventions (``../shared/DESIGN.md``, "Benchmark conventions"): fixed seeds, warm-up, several
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


def _flush_l2(device: torch.device) -> None:
    # 256 MB exceeds every current L2 (H100: 50 MB, H200: 60 MB), so no sample starts cache-warm.
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(64 << 20, dtype=torch.int32, device=device)
    buf.zero_()


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 2, repeats: int = 7,
            min_sample_s: float = 0.02, flush_l2: bool = True) -> dict:
    """Median time of one call of ``fn`` in ms.

    CPU: each sample loops ``fn`` until it lasts >= ``min_sample_s`` (one 0.1 ms call is below the
    timer's noise on a shared VM), so weights stay cache-warm there, as in a serving loop.
    CUDA: each sample is one call bracketed by events, after an L2 flush and a sync.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        samples = []
        for _ in range(repeats):
            if flush_l2:
                _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        inner = 1
    else:
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, int(min_sample_s / one))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return {"ms": statistics.median(samples), "ms_min": min(samples), "ms_max": max(samples),
            "repeats": repeats, "inner": inner}


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
