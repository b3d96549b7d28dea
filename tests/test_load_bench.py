"""bench_serving.py end to end at a toy size: a real server subprocess, real uploads of every delta
kind, the load from its separate process, every phase, and the Prometheus cross-check. It checks the
plumbing (and that server and bench still agree on the API), not the figures: ~40 s on 2 cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_serving_runs_end_to_end_and_its_metrics_agree(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--quick", "--sweep", "1,10", "--requests",
           "10", "--sat-duration", "1", "--lat-duration", "1.5", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout.strip().splitlines()
    tail = "\n".join(out[-8:] + proc.stderr.strip().splitlines()[-10:])
    assert proc.returncode == 0, f"bench_serving failed (exit {proc.returncode}):\n{tail}"
    summary = dict(kv.split("=", 1) for kv in out[-1].removeprefix("summary: ").split())
    assert out[-1].startswith("summary: ") and summary["errors"] == "0" and summary["metrics_check"] == "pass", tail
    assert float(summary["throughput_ratio_vs_base"]) > 0 and float(summary["ttft_p99_ms"]) > 0
    rows = [json.loads(line) for line in next(tmp_path.glob("bench_serving-*.jsonl")).read_text().splitlines()]
    phases = {r["phase"] for r in rows}
    assert {"sat_base_0", "sat_deltas_10_1", "sat_base_2", "ratio_deltas_10", "lat_base", "lat_uniform_10",
            "lat_zipf_10", "lat_hot_10", "summary"} <= phases, sorted(phases)
    # the ten warm deltas are one of each recipe: LoRA r4..r64, LoRA+bias, (IA)3, BEFT, bottleneck, BitFit
    recipes = next(r for r in rows if r["phase"] == "setup")["recipes"]
    assert len(set(recipes.values())) == 10
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("*.png")) == ["latency", "throughput"]


@pytest.mark.slow
def test_bench_scale_runs_end_to_end(tmp_path):
    """bench_scale.py at a toy size: 40 distinct deltas of the scale mix on the demo model, every phase once."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick", "--shape", "demo", "--num-deltas",
           "40", "--requests", "8", "--duration", "1", "--no-rss", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout.strip().splitlines()
    tail = "\n".join(out[-8:] + proc.stderr.strip().splitlines()[-10:])
    assert proc.returncode == 0, f"bench_scale failed (exit {proc.returncode}):\n{tail}"
    assert out[-1].startswith("summary: "), tail
    pairs = [kv.split("=", 1) for kv in out[-1].removeprefix("summary: ").split()]
    assert [k for k, _ in pairs[:8]] == ["num_deltas", "ratio_many_vs_32", "ratio_many_vs_base", "device_hit_rate",
                                         "bytes_per_delta_vs_real", "startup_rss_mb", "weights_mb", "errors"]
    summary = dict(pairs)
    assert summary["num_deltas"] == "40" and summary["errors"] == "0" and summary["server_tracebacks"] == "0", tail
    assert 1.0 <= float(summary["bytes_per_delta_vs_real"]) <= 1.25 and int(summary["resident"]) == 40
    assert float(summary["ratio_many_vs_32"]) > 0 and 0 < float(summary["device_hit_rate"]) <= 1
    rows = [json.loads(line) for line in next(tmp_path.glob("bench_scale-*.jsonl")).read_text().splitlines()]
    phases = {r["phase"] for r in rows}
    assert {"setup", "calibrate_base", "base_0a", "uniform_32_0", "uniform_many_0", "zipf_32_0", "zipf_many_0",
            "base_0b", "summary"} <= phases, sorted(phases)
