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


def _queried_names() -> set[str]:
    """Every deltaserve_* series the dashboard and the Prometheus rules read."""
    board = json.loads((GRAFANA / "deltaserve.json").read_text())
    text = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    text += " " + " ".join(v["definition"] for v in board["templating"]["list"] if "definition" in v)
    text += " " + (GRAFANA.parent / "prometheus" / "deltaserve-rules.yml").read_text()
    return set(re.findall(r"\b(deltaserve_[a-z_]+)\b", text))


def test_a_live_server_exports_every_series_the_dashboard_queries(tmp_path):
    import urllib.request

    from server_harness import Served, peft_lora, upload

    srv = Served(tmp_path)
    try:
        md = srv.tenant("acme")
        data, _ = peft_lora(srv.model_dir, seed=1)
        upload(srv, md, "d", data)
        for chunk in srv.client.with_key(md[0][1].removeprefix("Bearer ")).generate("hi", delta="d", max_new_tokens=3):
            pass
        scrape = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    finally:
        srv.close()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", scrape, flags=re.M))
    samples = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and not line.startswith("#")}
    suffix = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    missing = []
    for name in sorted(_queried_names()):
        family = next((f for f, kind in types.items() for s in suffix.get(kind, ())
                       if name in (f + s, f.removesuffix("_total") + s)), None)
        if family is None and name not in samples:
            missing.append(name)
    assert not missing, f"queried but not exported: {missing}"
    assert "deltaserve_delta_bytes_budget" in samples and "deltaserve_requests_total" in samples
