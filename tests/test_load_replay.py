"""benchmarks/replay_serving.py: bench_serving's workload through the engine alone, base and deltas on the same requests."""
import json

import pytest

from benchmarks import replay_serving


def test_replay_serves_the_same_requests_with_and_without_deltas(tmp_path, capsys):
    assert replay_serving.main(["--shape", "demo", "--deltas", "2", "--requests", "3", "--rounds", "1",
                                "--floor-steps", "0", "--out-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for f in tmp_path.glob("replay_serving-*.jsonl") for line in f.read_text().splitlines()]
    by_phase = {r["phase"]: r for r in rows if "phase" in r}
    assert "decode_floor" not in by_phase  # --floor-steps 0 skips it
    assert by_phase["base_0"]["tokens"] == by_phase["deltas_0"]["tokens"] > 0  # ignore_eos: every requested token
    ratio = by_phase["summary"]["ratio_vs_base"]
    assert ratio == pytest.approx(by_phase["deltas_0"]["tok_per_cpu_s"] / by_phase["base_0"]["tok_per_cpu_s"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: ratio_vs_base=")


def test_the_decode_floor_point_reads_every_delta_byte_once_at_the_copy_rate(tmp_path, capsys):
    assert replay_serving.main(["--shape", "demo", "--deltas", "3", "--requests", "2", "--rounds", "1",
                                "--floor-steps", "3", "--out-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for f in tmp_path.glob("replay_serving-*.jsonl") for line in f.read_text().splitlines()]
    fl = next(r for r in rows if r.get("phase") == "decode_floor")
    copy = next(r for r in rows if r.get("point") == "copy_bandwidth")
    assert fl["sequences"] == 3 and fl["delta_bytes"] > 0 and fl["copy_gbs"] == copy["copy_gbs"] > 0
    assert fl["floor_ms"] == pytest.approx(fl["delta_bytes"] / (fl["copy_gbs"] * 1e9) * 1e3)
    base, deltas, floor = fl["base_step_ms"], fl["delta_step_ms"], fl["floor_ms"]
    assert fl["floor_ratio_vs_base"] == pytest.approx(base / (base + floor)) and 0 < fl["floor_ratio_vs_base"] < 1
    assert fl["achieved_vs_floor"] == pytest.approx((deltas - base) / floor)
    assert "floor_ratio_vs_base=" in capsys.readouterr().out.strip().splitlines()[-1]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        replay_serving.main(["--deltas", "0"])
    with pytest.raises(SystemExit):
        replay_serving.main(["--floor-steps", "-1"])
    with pytest.raises(SystemExit):
        replay_serving.main(["--threads", "0"])
