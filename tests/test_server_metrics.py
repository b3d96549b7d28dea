"""Metrics and logs of the serving process without a server: engine stats translated into Prometheus
series on a private registry, and one key=value line per log event."""
from __future__ import annotations

import io
import re

import pytest

from server.engine.stats import RequestStats, StepStats
from server.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in metrics.scrape().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_translate_engine_stats_and_cumulative_snapshots():
    m = Metrics()
    m.record(StepStats(step=1, step_time=0.01, forward_time=0.008, num_tokens=12, prefill_tokens=10, decode_tokens=2,
                       num_seqs=3, num_deltas=2, num_running=3, num_waiting=1, waiting_on_delta=0, num_preempted=0,
                       kv_blocks_used=5, kv_blocks_total=64))
    m.record(RequestStats("r1", "acme", "lora", "length", 4, 8, 0.001, 0.02, 0.005, 0.06, 0))
    m.request_started("acme")
    m.request_ended("acme")
    m.request_finished("acme", "ok", ("lora", "bitfit"))

    class Device:
        budget_bytes, capacity_bytes, held_bytes, real_bytes = 1000, 600, 500, 450
        resident, pinned, loading, ready, queued, blocked = 2, 1, 1, 0, 1, 0
        hits, misses, evictions, loads = 5, 2, 0, 2
        load_seconds, install_seconds = 0.5, 0.1

    m.record_residency(Device())
    m.record_residency(Device())  # the same snapshot twice must not double the counters
    s = _samples(m)
    assert s['deltaserve_batch_size_count'] == 1 and s['deltaserve_batch_size_sum'] == 3
    assert s['deltaserve_step_distinct_deltas_sum'] == 2 and s['deltaserve_kv_blocks_in_use'] == 5
    assert s['deltaserve_time_to_first_token_seconds_count{tenant="acme"}'] == 1
    assert s['deltaserve_time_per_output_token_seconds_sum{tenant="acme"}'] == pytest.approx(0.005)
    assert s['deltaserve_generated_tokens_total{tenant="acme"}'] == 8
    assert s['deltaserve_requests_total{status="ok",tenant="acme"}'] == 1
    assert s['deltaserve_requests_by_delta_kind_total{kind="bitfit"}'] == 1
    assert s['deltaserve_requests_in_flight{tenant="acme"}'] == 0
    assert s['deltaserve_delta_cache_hits_total{tier="device"}'] == 5
    assert s['deltaserve_delta_load_seconds_total{tier="device"}'] == pytest.approx(0.6)
    assert s['deltaserve_delta_device_memory_bytes{state="held"}'] == 500
    assert s['deltaserve_delta_device_memory_bytes{state="budget"}'] == 1000
    assert s['deltaserve_delta_resident{tier="device"}'] == 2 and s['deltaserve_delta_bytes{tier="device"}'] == 500
    assert s['deltaserve_delta_pinned'] == 1 and s['deltaserve_delta_loading'] == 2
    Device.hits = 9
    m.record_residency(Device())
    assert _samples(m)['deltaserve_delta_cache_hits_total{tier="device"}'] == 9
    assert all(name.startswith("deltaserve_") for name in s)


def test_metrics_registries_are_private():
    a, b = Metrics(), Metrics()  # a second instance would clash on the global registry
    a.request_finished("x", "ok")
    assert 'deltaserve_requests_total{status="ok",tenant="x"}' in _samples(a)
    assert not any(k.startswith("deltaserve_requests_total{") for k in _samples(b))


def test_log_lines_are_key_value():
    from server import logs

    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        logs.get_logger("test").info("listening", address="127.0.0.1:1", reason='has "quotes" and spaces', n=3)
        logs.get_logger("test").debug("hidden")
    finally:
        logs.configure("warning")
    line = stream.getvalue().strip()
    assert "\n" not in line
    assert re.fullmatch(r'ts=\S+Z level=info event=listening address=127\.0\.0\.1:1 '
                        r'reason="has \\"quotes\\" and spaces" n=3', line), line
    with pytest.raises(ValueError, match="log_level"):
        logs.configure("loud")
