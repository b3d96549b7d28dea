"""deploy/grafana/deltaserve.json: what build_dashboard.py writes, and a well-formed dashboard."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"


def _builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_json_is_what_the_builder_writes():
    committed = json.loads((GRAFANA / "deltaserve.json").read_text())
    assert committed == _builder().dashboard(), "run: python deploy/grafana/build_dashboard.py"


def test_panels_are_unique_and_every_target_queries_deltaserve():
    board = _builder().dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and len({p["title"] for p in panels}) == len(panels)
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert re.search(r"\bdeltaserve_[a-z_]+", t["expr"]), (p["title"], t["expr"])
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    for required in ("Request rate by status", "Time to first token", "Time per output token", "Tokens per second",
                     "Scheduler queue", "Batch size", "Distinct deltas per step", "Delta cache hit ratio by tier",
                     "Mean delta load time", "KV cache use", "Host delta memory"):
        assert required in {p["title"] for p in panels}
