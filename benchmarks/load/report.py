"""Figures of one load phase from its client records, and the cross-check against the server's own
Prometheus histograms scraped before and after the phase.

Throughput is output tokens (and finished requests) over the phase's span, from the first planned
arrival to the last stream end, so a server that falls behind pays for its backlog. TTFT is send to
first token chunk, TPOT the mean gap between later tokens of a request (the server's definition in
``server/metrics.py``); both are reported at p50/p90/p99 in milliseconds.
"""
from __future__ import annotations

import math
from collections import Counter

from .record import Record
from .prom import Scrape

TTFT_METRIC = "deltaserve_time_to_first_token_seconds"
TPOT_METRIC = "deltaserve_time_per_output_token_seconds"
E2E_METRIC = "deltaserve_request_latency_seconds"
REQUESTS_METRIC = "deltaserve_requests_total"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(values: list[float], prefix: str) -> dict:
    out = {f"{prefix}_p{q}_ms": 1e3 * percentile(values, q) for q in (50, 90, 99)}
    out[f"{prefix}_mean_ms"] = 1e3 * sum(values) / len(values) if values else math.nan
    return out


def summarize(records: list[Record]) -> dict:
    ok = [r for r in records if r.status == "OK"]
    by_status = Counter(r.status for r in records)
    span = (max(r.end for r in records) - min(r.planned for r in records)) if records else math.nan
    window = max((r.planned for r in records), default=math.nan)  # last arrival
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    warm = [r.ttft for r in ok if r.ttft is not None and not r.cold and r.delta]
    cold = [r.ttft for r in ok if r.ttft is not None and r.cold]
    out = {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "by_status": dict(sorted(by_status.items())), "span_s": span, "arrival_window_s": window,
        # a server that keeps up ends soon after the last arrival; one that is saturated drains a backlog
        "saturated": bool(span - window >= 0.25 * span) if records else False,
        "req_per_s": len(ok) / span if span > 0 else math.nan,
        "tok_per_s": tokens / span if span > 0 else math.nan,
        "output_tokens": tokens, "prompt_tokens": sum(r.prompt_tokens for r in ok),
        **_ms(ttft, "ttft"), **_ms(tpot, "tpot"), **_ms([r.end - r.sent for r in ok], "e2e"),
        "cold_requests": len(cold), **_ms(cold, "ttft_cold"), **_ms(warm, "ttft_warm"),
        # open-loop fidelity: how late the load process sent requests (a late sender understates load)
        "send_lag_p50_ms": 1e3 * percentile([r.sent - r.planned for r in records], 50),
        "send_lag_max_ms": 1e3 * max((r.sent - r.planned for r in records), default=math.nan),
    }
    return out


def _check(name: str, client: float, server: float, rel: float, abs_: float) -> dict:
    diff = abs(client - server)
    ok = (math.isnan(client) and math.isnan(server)) or diff <= max(abs_, rel * abs(client))
    return {"what": name, "client": client, "server": server, "diff": diff, "ok": bool(ok)}


def cross_check(records: list[Record], before: Scrape, after: Scrape, *, rel: float = 0.3,
                abs_s: float = 0.1) -> dict:
    """Compare the client's figures with the server's histograms over the same phase.

    Counts must match exactly (every finished request observed once). Means compare the same
    quantity measured at two ends: the client's TTFT also holds the gRPC hop and the wait for the handler
    to run (the server stamps arrival at the handler's entry, before authentication and delta resolution,
    since a loaded box once held those worker threads for ~300 ms), hence a tolerance of ``rel`` of the
    value or ``abs_s`` seconds, whichever is larger (100 ms: a thread hop on a 2-core box shared by
    several jobs has been seen to take tens of ms; a histogram in the wrong unit is off by 1000x).
    The server's per-request timings (sent on the last chunk) must sum to the histogram's sum to 1%:
    same source, so any gap is a metrics bug.
    """
    ok = [r for r in records if r.status == "OK"]
    ttft = after.histogram(TTFT_METRIC) - before.histogram(TTFT_METRIC)
    tpot = after.histogram(TPOT_METRIC) - before.histogram(TPOT_METRIC)
    e2e = after.histogram(E2E_METRIC) - before.histogram(E2E_METRIC)
    status_after, status_before = after.by_label(REQUESTS_METRIC, "status"), before.by_label(REQUESTS_METRIC, "status")
    served_ok = status_after.get("ok", 0.0) - status_before.get("ok", 0.0)
    c_ttft = [r.ttft for r in ok if r.ttft is not None]
    c_tpot = [r.tpot for r in ok if r.tpot is not None]
    c_e2e = [r.end - r.sent for r in ok]
    s_ttft = [r.server_ttft for r in ok if r.server_ttft is not None]
    mean = (lambda xs: sum(xs) / len(xs) if xs else math.nan)
    checks = [
        _check("ok_requests_count", float(len(ok)), served_ok, 0.0, 0.0),
        _check("ttft_count", float(len(c_ttft)), ttft.count, 0.0, 0.0),
        _check("tpot_count", float(len(c_tpot)), tpot.count, 0.0, 0.0),
        _check("e2e_count", float(len(c_e2e)), e2e.count, 0.0, 0.0),
        _check("ttft_mean_s", mean(c_ttft), ttft.mean, rel, abs_s),
        _check("tpot_mean_s", mean(c_tpot), tpot.mean, rel, abs_s / 10),
        _check("e2e_mean_s", mean(c_e2e), e2e.mean, rel, abs_s),
        _check("ttft_sum_s_server_timings_vs_histogram", sum(s_ttft), ttft.sum, 0.01, 1e-3),
    ]
    quantiles = {f"{name}_p{q}_ms": {"client": 1e3 * percentile(vals, q), "server_histogram": 1e3 * hist.quantile(q / 100)}
                 for name, vals, hist in (("ttft", c_ttft, ttft), ("tpot", c_tpot, tpot)) for q in (50, 99)}
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "quantiles": quantiles}


def format_check_short(check: dict) -> str:
    """One line: the server's figure next to ours for each check, e.g. ``ttft_mean_s=0.58/0.56``."""
    parts = [f"{c['what'].replace('_sum_s_server_timings_vs_histogram', '_sum(timings/hist)')}"
             f"={c['client']:.4g}/{c['server']:.4g}"
             f"{'' if c['ok'] else '(FAIL)'}" for c in check["checks"]]
    return f"  metrics {'ok  ' if check['ok'] else 'FAIL'} client/server: " + " ".join(parts)


def format_check(check: dict) -> list[str]:
    lines = []
    for c in check["checks"]:
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['what']:42s} client={c['client']:.4g} "
                     f"server={c['server']:.4g} diff={c['diff']:.3g}")
    for k, v in check["quantiles"].items():
        lines.append(f"       {k:42s} client={v['client']:.4g} server_histogram~{v['server_histogram']:.4g}")
    return lines
