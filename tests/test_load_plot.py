"""plot.py draws both figures from bench_serving JSONL rows (and bench_engine baselines when present),
and refuses what it cannot read with a one-line error. Synthetic rows, Agg backend: a few seconds."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import plot  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cpu_count": 2, "torch": "x", "gpu": None}


def _rows(run: str) -> list[dict]:
    rows = []
    for i, tok in enumerate((500.0, 520.0, 480.0)):
        rows.append({"run": run, "phase": f"sat_base_{i}", "group": "throughput", "num_deltas": 0, "tok_per_s": tok})
    for n, ratio in ((1, 0.95), (8, 0.6), (32, 0.4)):
        rows.append({"run": run, "phase": f"ratio_deltas_{n}", "group": "ratio", "num_deltas": n,
                     "tok_per_s": 500 * ratio, "throughput_ratio_vs_base": ratio, "ratios": [ratio - 0.05, ratio + 0.05],
                     "cpu_ratio_vs_base": ratio + 0.02, "cpu_ratios": [ratio, ratio + 0.04]})
    for n, name in ((0, "lat_base"), (32, "lat_uniform_32")):
        rows.append({"run": run, "phase": name, "group": "latency", "num_deltas": n, "rate": 4.0,
                     "samples": {"ttft_ms": [10.0, 20.0, 30.0], "tpot_ms": [1.0, None, 2.0],
                                 "cold": [False, n > 0, False]}})
    return [{**r, "settings": {"quick": True}, "machine": MACHINE} for r in rows]


def test_plot_run_draws_both_figures_with_engine_baselines(tmp_path):
    path = tmp_path / "bench_serving-2026-01-02.jsonl"
    lines = _rows("old") + _rows("new")
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (tmp_path / "bench_engine-2026-01-02.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"run": "e", "workload": "uniform", "variant": "lora_8", "ratio_to_base": 0.7},
        {"run": "e", "workload": "uniform", "variant": "peft_mixed_32", "ratio_to_engine_base": 0.1}]) + "\n")
    assert [label for label, _ in plot.engine_baselines(tmp_path)] == [
        "engine in-process, no gRPC (bench_engine)", "PEFT mixed batch, adapter_names (bench_engine)"]
    made = plot.plot_run(path)
    assert sorted(p.name for p in made) == ["bench_serving-latency-2026-01-02.png",
                                            "bench_serving-throughput-2026-01-02.png"]
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_errors_are_one_line(tmp_path):
    bad = tmp_path / "bench_serving-2026-01-02.jsonl"
    bad.write_text('{"run": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bench_serving-2026-01-02.jsonl:2: not a JSON line"):
        plot.plot_run(bad)
    bad.write_text(json.dumps({"run": "a", "phase": "x"}) + "\n")
    with pytest.raises(ValueError, match="no rows of run 'zzz'"):
        plot.plot_run(bad, run="zzz")
    assert plot.main([str(tmp_path / "missing.jsonl")]) == 1
