"""benchmarks/replay_serving.py: bench_serving's workload through the engine alone, base and deltas on the same requests."""
import json

import pytest

from benchmarks import replay_serving


def test_replay_serves_the_same_requests_with_and_without_deltas(tmp_path, capsys):
    assert replay_serving.main(["--shape", "demo", "--deltas", "2", "--requests", "3", "--rounds", "1",
                                "--out-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for f in tmp_path.glob("replay_serving-*.jsonl") for line in f.read_text().splitlines()]
    by_phase = {r["phase"]: r for r in rows}
    assert by_phase["base_0"]["tokens"] == by_phase["deltas_0"]["tokens"] > 0  # ignore_eos: every requested token
    ratio = by_phase["summary"]["ratio_vs_base"]
    assert ratio == pytest.approx(by_phase["deltas_0"]["tok_per_cpu_s"] / by_phase["base_0"]["tok_per_cpu_s"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: ratio_vs_base=")


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        replay_serving.main(["--deltas", "0"])
