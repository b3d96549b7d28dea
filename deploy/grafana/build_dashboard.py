"""Writes deploy/grafana/deltaserve.json, the Grafana dashboard of one or more deltaserve processes.

    python deploy/grafana/build_dashboard.py            # rewrite deltaserve.json
    python deploy/grafana/build_dashboard.py --panels   # print the panel list (README)

Panels query the raw series of server/metrics.py (not the recording rules), so the dashboard works on
any Prometheus that scrapes deltaserve, with or without deploy/prometheus/deltaserve-rules.yml loaded.
Variables: the Prometheus data source, job, instance and tenant. tests/test_deploy_grafana.py checks
that the committed JSON is what this script writes, and that a live server exports every series it
queries.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "deltaserve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
TSEL = SEL + ', tenant=~"$tenant"'
RATE = "$__rate_interval"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, sel: str = TSEL) -> list[dict]:
    return [q(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{{{sel}}}[{RATE}])))", f"p{int(p * 100)}")
            for p in (0.5, 0.9, 0.99)]


# (row title, [(panel title, unit, description, [targets])])
ROWS = [
    ("Requests", [
        ("Request rate by status", "reqps", "Generate calls per second by final status (ok, or the gRPC code).",
         [q(f"sum by (status) (rate(deltaserve_requests_total{{{TSEL}}}[{RATE}]))", "{{status}}")]),
        ("Server error ratio", "percentunit", "Calls failing on the server's side (internal, unknown, unavailable, "
         "data_loss, deadline_exceeded) over all calls.",
         [q(f'sum(rate(deltaserve_requests_total{{{TSEL}, status=~"internal|unknown|unavailable|data_loss|'
            f'deadline_exceeded"}}[{RATE}])) / sum(rate(deltaserve_requests_total{{{TSEL}}}[{RATE}]))', "errors"),
          q(f'sum(rate(deltaserve_requests_total{{{TSEL}, status="resource_exhausted"}}[{RATE}])) / '
            f"sum(rate(deltaserve_requests_total{{{TSEL}}}[{RATE}]))", "rejected (quota, queue full)")]),
        ("Requests in flight", "short", "Generate calls being served, by tenant.",
         [q(f"sum by (tenant) (deltaserve_requests_in_flight{{{TSEL}}})", "{{tenant}}")]),
        ("Requests by delta kind", "reqps", "Finished requests by the kind of delta they used (base = none).",
         [q(f"sum by (kind) (rate(deltaserve_requests_by_delta_kind_total{{{SEL}}}[{RATE}]))", "{{kind}}")]),
    ]),
    ("Latency", [
        ("End-to-end latency", "s", "Arrival to last token.", quantiles("deltaserve_request_latency_seconds")),
        ("Time to first token", "s", "Arrival to the first generated token (TTFT).",
         quantiles("deltaserve_time_to_first_token_seconds")),
        ("Time per output token", "s", "Mean time per generated token after the first (TPOT), per request.",
         quantiles("deltaserve_time_per_output_token_seconds")),
        ("Queue wait", "s", "Arrival to the first scheduling step.", quantiles("deltaserve_queue_wait_seconds")),
    ]),
    ("Throughput and batching", [
        ("Tokens per second", "short", "Prompt and generated tokens of finished requests, per second.",
         [q(f"sum(rate(deltaserve_generated_tokens_total{{{TSEL}}}[{RATE}]))", "generated"),
          q(f"sum(rate(deltaserve_prompt_tokens_total{{{TSEL}}}[{RATE}]))", "prompt")]),
        ("Scheduler queue", "short", "Sequences waiting for admission and in the running batch.",
         [q(f"sum(deltaserve_scheduler_waiting{{{SEL}}})", "waiting"),
          q(f"sum(deltaserve_scheduler_running{{{SEL}}})", "running")]),
        ("Batch size", "short", "Sequences and tokens (prefill + decode) in one engine step.",
         [q(f"histogram_quantile(0.5, sum by (le) (rate(deltaserve_batch_size_bucket{{{SEL}}}[{RATE}])))", "seqs p50"),
          q(f"histogram_quantile(0.99, sum by (le) (rate(deltaserve_batch_size_bucket{{{SEL}}}[{RATE}])))", "seqs p99"),
          q(f"sum(rate(deltaserve_batch_tokens_sum{{{SEL}}}[{RATE}])) / "
            f"sum(rate(deltaserve_batch_tokens_count{{{SEL}}}[{RATE}]))", "tokens mean")]),
        ("Distinct deltas per step", "short", "How many different deltas one forward pass mixes.",
         [q(f"sum(rate(deltaserve_step_distinct_deltas_sum{{{SEL}}}[{RATE}])) / "
            f"sum(rate(deltaserve_step_distinct_deltas_count{{{SEL}}}[{RATE}]))", "mean"),
          q(f"histogram_quantile(0.99, sum by (le) (rate(deltaserve_step_distinct_deltas_bucket{{{SEL}}}[{RATE}])))",
            "p99")]),
        ("Engine step time", "s", "Wall time of one engine step.",
         quantiles("deltaserve_step_duration_seconds", SEL)),
    ]),
    ("Deltas", [
        ("Delta cache hit ratio by tier", "percentunit", "Lookups served by the device slots and the host-memory "
         "tier without a load.",
         [q(f"sum by (tier) (rate(deltaserve_delta_cache_hits_total{{{SEL}}}[{RATE}])) / "
            f"(sum by (tier) (rate(deltaserve_delta_cache_hits_total{{{SEL}}}[{RATE}])) + "
            f"sum by (tier) (rate(deltaserve_delta_cache_misses_total{{{SEL}}}[{RATE}])))", "{{tier}}")]),
        ("Delta loads and evictions", "ops", "Deltas brought into (loads) and evicted from each tier, per second.",
         [q(f"sum by (tier) (rate(deltaserve_delta_loads_total{{{SEL}}}[{RATE}]))", "loads {{tier}}"),
          q(f"sum by (tier) (rate(deltaserve_delta_cache_evictions_total{{{SEL}}}[{RATE}]))", "evictions {{tier}}")]),
        ("Mean delta load time", "s", "Seconds per load: device = host/disk to a slot, host = disk to memory.",
         [q(f"sum by (tier) (rate(deltaserve_delta_load_seconds_total{{{SEL}}}[{RATE}])) / "
            f"sum by (tier) (rate(deltaserve_delta_loads_total{{{SEL}}}[{RATE}]))", "{{tier}}")]),
        ("Uploads", "ops", "UploadDelta calls by status, and payload bytes per second.",
         [q(f"sum by (status) (rate(deltaserve_uploads_total{{{TSEL}}}[{RATE}]))", "{{status}}"),
          q(f"sum(rate(deltaserve_upload_bytes_total{{{TSEL}}}[{RATE}]))", "bytes/s")]),
    ]),
    ("Memory", [
        ("KV cache use", "percentunit", "KV-cache blocks in use over blocks in the pool.",
         [q(f"sum(deltaserve_kv_blocks_in_use{{{SEL}}}) / sum(deltaserve_kv_blocks_total{{{SEL}}})", "KV blocks")]),
        ("Device delta memory", "bytes", "Bytes the resident deltas hold (bucketed rows), the arenas allocated, "
         "and the budget (delta_memory_bytes); how many deltas are resident follows from their sizes.",
         [q(f'sum(deltaserve_delta_bytes{{{SEL}, tier="device"}})', "held"),
          q(f'sum(deltaserve_delta_device_memory_bytes{{{SEL}, state="capacity"}})', "allocated"),
          q(f'sum(deltaserve_delta_bytes_budget{{{SEL}, tier="device"}})', "budget")]),
        ("Device deltas", "short", "Deltas resident in device memory, and those a running request uses (pinned).",
         [q(f'sum(deltaserve_delta_resident{{{SEL}, tier="device"}})', "resident"),
          q(f"sum(deltaserve_delta_pinned{{{SEL}}})", "pinned")]),
        ("Host delta memory", "bytes", "Bytes of deltas in the host-memory tier, and its budget (host_cache_bytes).",
         [q(f'sum(deltaserve_delta_bytes{{{SEL}, tier="host"}})', "resident"),
          q(f'sum(deltaserve_delta_bytes_budget{{{SEL}, tier="host"}})', "budget")]),
        ("Engine alive", "short", "1 while the engine loop runs, per process.",
         [q(f"deltaserve_engine_alive{{{SEL}}}", "{{instance}}")]),
    ]),
]


def panel(pid: int, title: str, unit: str, description: str, targets: list[dict], x: int, y: int) -> dict:
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "gridPos": {"h": 8, "w": 6, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DS, "refId": chr(ord("A") + i), **t} for i, t in enumerate(targets)],
    }


def variable(name: str, query: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "query": {"query": query,
            "refId": name}, "definition": query, "refresh": 2, "includeAll": True, "multi": True,
            "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1}


def dashboard() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, spec in enumerate(row):
            panels.append(panel(pid, *spec, x=(i % 4) * 6, y=y + (i // 4) * 8))
            pid += 1
        y += 8 * ((len(row) + 3) // 4)
    return {
        "uid": "deltaserve", "title": "deltaserve", "description": "Multi-tenant delta serving: requests, latency, "
        "batching, delta residency and memory (server/metrics.py).", "tags": ["deltaserve", "llm", "inference"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "browser",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            variable("job", "label_values(deltaserve_engine_alive, job)", "Job"),
            variable("instance", 'label_values(deltaserve_engine_alive{job=~"$job"}, instance)', "Instance"),
            variable("tenant", 'label_values(deltaserve_requests_total{job=~"$job"}, tenant)', "Tenant"),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def panel_list() -> str:
    lines = []
    for row_title, row in ROWS:
        lines.append(f"- **{row_title}**: " + "; ".join(f"{title} ({unit})" for title, unit, *_ in row))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--panels", action="store_true", help="print the panel list instead of writing the JSON")
    args = parser.parse_args()
    if args.panels:
        print(panel_list())
        return 0
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
