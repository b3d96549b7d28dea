"""Unit tests of the load tools' pure parts: open-loop plans, Prometheus parsing and histogram
arithmetic, percentiles and the client/server cross-check. No server, no torch: milliseconds."""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from load.record import Record  # noqa: E402
from load.prom import Scrape, ScrapeError  # noqa: E402
from load.report import cross_check, percentile, summarize  # noqa: E402
from load.workload import DeltaRef, LengthDist, WorkloadConfig, as_base, fresh_prompts, make_plan  # noqa: E402

WARM = [DeltaRef(i % 4, f"w{i}", "lora") for i in range(32)]
COLD = [DeltaRef(i % 4, f"c{i}", "lora") for i in range(100)]


def _cfg(**kw) -> WorkloadConfig:
    return WorkloadConfig(**{"rate": 20.0, "duration_s": 50.0, "max_requests": 400, **kw})


def test_plan_is_poisson_at_the_asked_rate_and_bounded():
    plan = make_plan(_cfg(rate=20.0, duration_s=1000.0, max_requests=2000), WARM)
    assert len(plan) == 2000  # the count bound wins
    gaps = [b.at - a.at for a, b in zip(plan, plan[1:])]
    assert abs(statistics.mean(gaps) - 1 / 20) < 0.1 / 20  # exponential gaps, mean 1/rate
    assert abs(statistics.stdev(gaps) / statistics.mean(gaps) - 1.0) < 0.1  # CV 1: Poisson, not fixed spacing
    short = make_plan(_cfg(rate=20.0, duration_s=2.0, max_requests=10_000), WARM)
    assert short and max(p.at for p in short) < 2.0  # the time bound wins


def test_plan_is_reproducible_and_the_base_twin_differs_only_in_delta():
    a, b = make_plan(_cfg(seed=3), WARM), make_plan(_cfg(seed=3), WARM)
    assert [(p.at, p.delta, p.prompt, p.max_new_tokens) for p in a] == [(p.at, p.delta, p.prompt, p.max_new_tokens)
                                                                        for p in b]
    base = as_base(a)
    assert all(q.delta == "" and q.kind == "base" for q in base)
    assert [(p.at, p.prompt, p.max_new_tokens, p.seed) for p in a] == [(q.at, q.prompt, q.max_new_tokens, q.seed)
                                                                       for q in base]


def test_fresh_prompts_keep_the_work_and_share_no_prefix_block():
    plan = make_plan(_cfg(seed=3, vocab_size=259), WARM)
    a, b, again = fresh_prompts(plan, 1, 259), fresh_prompts(plan, 2, 259), fresh_prompts(plan, 1, 259)
    assert [p.prompt for p in a] == [p.prompt for p in again]  # reproducible from the salt
    for q in (a, b):  # arrivals, deltas, lengths and seeds unchanged: the same work
        assert [(p.at, p.delta, len(p.prompt), p.max_new_tokens, p.seed) for p in q] == \
            [(p.at, p.delta, len(p.prompt), p.max_new_tokens, p.seed) for p in plan]
        assert all(3 <= t < 259 for p in q for t in p.prompt)
    # no two phases (nor two requests of one) share a first KV block of 16 tokens: nothing for the prefix cache
    firsts = [tuple(p.prompt[:16]) for q in (plan, a, b) for p in q if len(p.prompt) >= 16]
    assert len(set(firsts)) == len(firsts)


@pytest.mark.parametrize("popularity", ["uniform", "zipf", "hot"])
def test_popularity_shapes(popularity):
    plan = make_plan(_cfg(popularity=popularity, num_deltas=32, max_requests=4000, duration_s=1e6), WARM)
    counts = [sum(p.delta == d.name for p in plan) for d in WARM]
    assert sum(counts) == len(plan) == 4000
    if popularity == "uniform":
        assert max(counts) < 3 * min(counts)
    elif popularity == "zipf":
        assert counts[0] > 5 * counts[31] and counts[0] == max(counts)
    else:
        hot_share = sum(p.tenant == 0 for p in plan) / len(plan)
        assert abs(hot_share - 0.8) < 0.03


def test_num_deltas_limits_the_pool_and_cold_deltas_are_used_once():
    plan = make_plan(_cfg(num_deltas=8, cold_fraction=0.2), WARM, COLD)
    warm_used = {p.delta for p in plan if not p.cold}
    assert warm_used <= {d.name for d in WARM[:8]}
    cold_used = [p.delta for p in plan if p.cold]
    assert len(cold_used) == len(set(cold_used)) and 0.1 < len(cold_used) / len(plan) < 0.3
    assert all(name.startswith("c") for name in cold_used)


def test_workload_and_length_validation_name_the_field():
    with pytest.raises(ValueError, match="popularity"):
        _cfg(popularity="bursty")
    with pytest.raises(ValueError, match="rate"):
        _cfg(rate=0.0)
    with pytest.raises(ValueError, match="median"):
        LengthDist(10, 0.5, 20, 30)
    with pytest.raises(ValueError, match="warm deltas"):
        make_plan(_cfg(num_deltas=64), WARM)
    d = LengthDist(24, 0.5, 4, 64)
    import random

    rng = random.Random(0)
    xs = [d.sample(rng) for _ in range(5000)]
    assert min(xs) >= 4 and max(xs) <= 64 and 20 <= statistics.median(xs) <= 28


EXPO = """# HELP deltaserve_time_to_first_token_seconds Arrival to first generated token.
# TYPE deltaserve_time_to_first_token_seconds histogram
deltaserve_time_to_first_token_seconds_bucket{le="0.1",tenant="a"} 1.0
deltaserve_time_to_first_token_seconds_bucket{le="0.5",tenant="a"} 3.0
deltaserve_time_to_first_token_seconds_bucket{le="+Inf",tenant="a"} 4.0
deltaserve_time_to_first_token_seconds_sum{tenant="a"} 2.0
deltaserve_time_to_first_token_seconds_count{tenant="a"} 4.0
deltaserve_time_to_first_token_seconds_bucket{le="0.1",tenant="b \\"x\\""} 1.0
deltaserve_time_to_first_token_seconds_bucket{le="0.5",tenant="b \\"x\\""} 1.0
deltaserve_time_to_first_token_seconds_bucket{le="+Inf",tenant="b \\"x\\""} 1.0
deltaserve_time_to_first_token_seconds_sum{tenant="b \\"x\\""} 0.05
deltaserve_time_to_first_token_seconds_count{tenant="b \\"x\\""} 1.0
deltaserve_requests_total{status="ok",tenant="a"} 4.0
deltaserve_requests_total{status="cancelled",tenant="a"} 2.0
deltaserve_requests_total{status="ok",tenant="b \\"x\\""} 1.0
deltaserve_kv_blocks_in_use 7.0
"""


def test_scrape_parses_labels_sums_and_histograms():
    m = Scrape.parse(EXPO)
    assert m.value("deltaserve_kv_blocks_in_use") == 7.0
    assert m.value("deltaserve_requests_total", status="ok") == 5.0
    assert m.by_label("deltaserve_requests_total", "status") == {"ok": 5.0, "cancelled": 2.0}
    assert m.value("deltaserve_requests_total", tenant='b "x"') == 1.0  # escaped quotes unescaped
    h = m.histogram("deltaserve_time_to_first_token_seconds")
    assert h.count == 5.0 and h.sum == pytest.approx(2.05) and h.buckets[0.1] == 2.0 and h.buckets[math.inf] == 5.0
    assert h.quantile(0.5) == pytest.approx(0.1 + 0.4 * (2.5 - 2) / 2)  # inside the (0.1, 0.5] bucket
    assert h.quantile(1.0) == 0.5  # past the last finite bound: the bound is all we know
    diff = h - Scrape.parse("").histogram("deltaserve_time_to_first_token_seconds")
    assert diff.count == 5.0
    with pytest.raises(ScrapeError, match="cannot parse"):
        Scrape.parse("this is not { a sample")


def _rec(i, sent, first, end, tokens, status="OK", cold=False, server_ttft=None):
    return Record(i, 0, "d" if i % 2 else "", "lora", cold, 10, tokens, sent, sent, first, end, tokens, status,
                  "length" if status == "OK" else "", server_ttft=server_ttft)


def test_percentile_and_summary():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and math.isnan(percentile([], 50))
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    recs = [_rec(0, 0.0, 0.1, 1.1, 11), _rec(1, 0.5, 0.7, 1.7, 6, cold=True), _rec(2, 1.0, None, 1.2, 0, "CANCELLED")]
    s = summarize(recs)
    assert s["requests"] == 3 and s["ok"] == 2 and s["by_status"] == {"CANCELLED": 1, "OK": 2}
    assert s["span_s"] == pytest.approx(1.7) and s["tok_per_s"] == pytest.approx(17 / 1.7)
    assert s["ttft_p50_ms"] == pytest.approx(150.0) and s["tpot_p50_ms"] == pytest.approx(150.0)
    assert s["cold_requests"] == 1 and s["ttft_cold_p50_ms"] == pytest.approx(200.0)


def test_cross_check_matches_and_catches_a_missing_observation():
    before = Scrape.parse("")
    recs = [_rec(0, 0.0, 0.1, 1.1, 11, server_ttft=0.09), _rec(1, 0.5, 0.7, 1.7, 6, server_ttft=0.19)]
    lines = [
        'deltaserve_time_to_first_token_seconds_bucket{le="+Inf",tenant="a"} 2.0',
        'deltaserve_time_to_first_token_seconds_sum{tenant="a"} 0.28',
        'deltaserve_time_to_first_token_seconds_count{tenant="a"} 2.0',
        'deltaserve_time_per_output_token_seconds_bucket{le="+Inf",tenant="a"} 2.0',
        'deltaserve_time_per_output_token_seconds_sum{tenant="a"} 0.3',
        'deltaserve_time_per_output_token_seconds_count{tenant="a"} 2.0',
        'deltaserve_request_latency_seconds_bucket{le="+Inf",tenant="a"} 2.0',
        'deltaserve_request_latency_seconds_sum{tenant="a"} 2.25',
        'deltaserve_request_latency_seconds_count{tenant="a"} 2.0',
        'deltaserve_requests_total{status="ok",tenant="a"} 2.0',
    ]
    good = cross_check(recs, before, Scrape.parse("\n".join(lines)))
    assert good["ok"], good["checks"]
    short = cross_check(recs, before, Scrape.parse("\n".join(lines).replace("_count{tenant=\"a\"} 2.0\n"
                                                                            "deltaserve_time_per", "_count{tenant=\"a\"} 1.0\n"
                                                                            "deltaserve_time_per")))
    failed = {c["what"] for c in short["checks"] if not c["ok"]}
    assert "ttft_count" in failed
