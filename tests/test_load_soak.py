"""The soak test in the suite: ``benchmarks/soak.py`` for a short, bounded time against a real server
on loopback (its own process), and it must pass: every request ended with an allowed status, the
server settled back to its baseline (KV blocks, slots, memory), every listed delta verifies, and
SIGTERM drained cleanly. About a minute on 2 cores: server start ~20 s, warm-up 4 s, soak 20 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOAK_S = 20
BOUND_S = 420  # server start on a busy 2-core box + warm-up + soak + verification + drain, with slack


@pytest.mark.slow
def test_soak_passes_for_a_short_bounded_run(tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", str(SOAK_S),
                           "--rate", "4", "--upload-every", "1.0", "--max-live", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=BOUND_S)
    out = proc.stdout.strip().splitlines()
    tail = "\n".join(out[-5:] + proc.stderr.strip().splitlines()[-15:])
    assert proc.returncode == 0, f"soak failed (exit {proc.returncode}):\n{tail}"
    assert out and out[-1].startswith("summary: result=pass "), f"last line is not a passing summary:\n{tail}"
    summary = dict(kv.split("=", 1) for kv in out[-1].removeprefix("summary: ").split())
    # the run exercised what it claims to: completions, cancellations, deadlines, churn, verification
    for key in ("ok", "cancelled", "deadline_exceeded", "uploads", "deletes", "verified_deltas"):
        assert int(summary[key]) > 0, f"soak exercised no {key}: {out[-1]}"
    rows = [json.loads(line) for f in tmp_path.glob("soak-*.jsonl") for line in f.read_text().splitlines()]
    verdict = [r for r in rows if r.get("phase") == "verdict"]
    assert verdict and verdict[-1]["verdict"] == "pass", verdict
    assert verdict[-1]["end"]["in_flight"] == 0 and verdict[-1]["end"]["slots_pinned"] == 0
