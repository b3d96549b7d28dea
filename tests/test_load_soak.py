"""The soak test in the suite: ``benchmarks/soak.py`` for a short, bounded time against a real server
on loopback (its own process), and it must pass: every request ended with an allowed status (the abusive
ones of load/abuse.py too: maximal prompts, zip bombs, cancelled and over-quota uploads, upload bursts),
the server settled back to its baseline (KV blocks, delta pins, memory, disk), every listed delta verifies, and
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
                           "--rate", "4", "--upload-every", "1.0", "--max-live", "3", "--abuse-every", "1.0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=BOUND_S)
    out = proc.stdout.strip().splitlines()
    tail = "\n".join(out[-5:] + proc.stderr.strip().splitlines()[-15:])
    assert proc.returncode == 0, f"soak failed (exit {proc.returncode}):\n{tail}"
    assert out and out[-1].startswith("summary: result=pass "), f"last line is not a passing summary:\n{tail}"
    summary = dict(kv.split("=", 1) for kv in out[-1].removeprefix("summary: ").split())
    # the run exercised what it claims to: completions, cancellations, deadlines, churn, verification
    for key in ("ok", "cancelled", "deadline_exceeded", "uploads", "deletes", "verified_deltas", "big_prompts",
                "zip_bombs", "garbage_uploads", "upload_cancels", "over_quota", "upload_bursts"):
        assert int(summary[key]) > 0, f"soak exercised no {key}: {out[-1]}"
    assert summary["tmp_entries_end"] == "0" and summary["orphan_blobs_end"] == "0"
    rows = [json.loads(line) for f in tmp_path.glob("soak-*.jsonl") for line in f.read_text().splitlines()]
    verdict = [r for r in rows if r.get("phase") == "verdict"]
    assert verdict and verdict[-1]["verdict"] == "pass", verdict
    assert verdict[-1]["end"]["in_flight"] == 0 and verdict[-1]["end"]["pinned"] == 0


# ---- the soak's verdict logic (load/mixed.py) on hand-made records: no server, milliseconds -----------
sys.path.insert(0, str(ROOT / "benchmarks"))


def _soak():
    from load import mixed as soak

    class FakeServer:  # psutil needs a live pid: ours
        pid = os.getpid()
        metrics_url = ""

    return soak, soak.Soak(soak.SoakSettings(duration_s=1.0), FakeServer(), ["k0"], {}, results=None)


def _record(status, *, tokens=4, finish="length", end=1.0, cancelled=False):
    from load.record import Record

    return Record(0, 0, "d", "plain", False, 4, 4, 0.0, 0.0, 0.1, end, tokens, status, finish,
                  cancelled_by_client=cancelled)


def test_soak_verdict_accepts_allowed_outcomes():
    soak, s = _soak()
    gone = soak.LiveDelta(0, "d", "ia3", deleted_at=s.t0 + 0.5)  # deleted before the request ended
    s.records = [("plain", _record("OK"), None), ("cancel", _record("CANCELLED", tokens=1, cancelled=True), None),
                 ("deadline", _record("DEADLINE_EXCEEDED", tokens=2), None), ("deleted", _record("NOT_FOUND"), gone),
                 ("plain", _record("NOT_FOUND", end=1.0), gone)]
    assert s.check_records() == {"plain:OK": 1, "cancel:CANCELLED": 1, "deadline:DEADLINE_EXCEEDED": 1,
                                 "deleted:NOT_FOUND": 1, "plain:NOT_FOUND": 1}


@pytest.mark.parametrize("behaviour,record,why", [
    ("plain", _record("INTERNAL"), "ended INTERNAL"),
    ("base", _record("UNKNOWN"), "ended UNKNOWN"),
    ("plain", _record("HANG"), "ended HANG"),
    ("plain", _record("DEADLINE_EXCEEDED"), "ended DEADLINE_EXCEEDED"),  # it had no deadline
    ("plain", _record("NOT_FOUND"), "ended NOT_FOUND"),  # its delta was never deleted
    ("deleted", _record("OK"), "ended OK"),  # a deleted delta served
    ("plain", _record("OK", tokens=3), "3/4 tokens"),  # lost tokens
])
def test_soak_verdict_rejects_violations(behaviour, record, why):
    soak, s = _soak()
    s.records = [(behaviour, record, None)]
    with pytest.raises(soak.Violation, match=why):
        s.check_records()


def test_soak_not_found_allowed_only_if_deleted_before_the_request_ended():
    soak, s = _soak()
    late = soak.LiveDelta(0, "d", "ia3", deleted_at=s.t0 + 5.0)  # deleted after the request had ended
    s.records = [("plain", _record("NOT_FOUND", end=1.0), late)]
    with pytest.raises(soak.Violation, match="ended NOT_FOUND"):
        s.check_records()
