"""Prometheus metrics on a private registry (DESIGN D11, STYLE habit 14).

The engine, the slot manager and the store emit plain stats dataclasses; this is the only module
that imports ``prometheus_client``. Every collector is declared here, named ``deltaserve_*``, and
labelled only by bounded values: tenant, delta kind, cache tier, status, RPC method. Never a delta
id: per-delta usage is served by ``Deltas.GetDelta``, not as one time series per delta.

Source: vLLM ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``), but with a registry per
instance instead of unregistering from the global one.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

# Latency buckets span a 1 ms decode step on a GPU to a 2-minute generation on 2 CPU cores.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TIERS = ("device", "host", "disk")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._last: dict[tuple, float] = {}  # cumulative counters seen in stats, to turn them into increments
        # requests (from the gRPC edge)
        self.requests = Counter("deltaserve_requests", "Generate calls by final status (ok or a gRPC code name).",
                                ["tenant", "status"], registry=r)
        self.requests_by_kind = Counter("deltaserve_requests_by_delta_kind", "Generate calls by the delta kinds they "
                                        "used ('none' = base model).", ["kind"], registry=r)
        self.rpcs = Counter("deltaserve_rpcs", "Every RPC by method and status code.", ["method", "code"], registry=r)
        self.in_flight = Gauge("deltaserve_requests_in_flight", "Generate calls being served.", ["tenant"], registry=r)
        self.e2e = Histogram("deltaserve_request_latency_seconds", "End-to-end Generate latency, arrival to last token.",
                             ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("deltaserve_time_to_first_token_seconds", "Arrival to first generated token.",
                              ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("deltaserve_time_per_output_token_seconds", "Mean time per generated token after the "
                              "first.", ["tenant"], buckets=STEP_BUCKETS, registry=r)
        self.queue_wait = Histogram("deltaserve_queue_wait_seconds", "Arrival to first scheduling step.",
                                    ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "Prompt tokens of finished requests.",
                                     ["tenant"], registry=r)
        self.generated_tokens = Counter("deltaserve_generated_tokens", "Generated tokens of finished requests.",
                                        ["tenant"], registry=r)
        # engine steps
        self.step_time = Histogram("deltaserve_step_duration_seconds", "Engine step wall time.",
                                   buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("deltaserve_batch_size", "Sequences in one engine step.",
                                    buckets=COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("deltaserve_batch_tokens", "Tokens (prefill + decode) in one engine step.",
                                      buckets=COUNT_BUCKETS, registry=r)
        self.step_deltas = Histogram("deltaserve_step_distinct_deltas", "Distinct deltas in one engine step.",
                                     buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.running = Gauge("deltaserve_scheduler_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge("deltaserve_scheduler_waiting", "Sequences waiting for admission.", registry=r)
        self.kv_used = Gauge("deltaserve_kv_blocks_in_use", "KV-cache blocks in use.", registry=r)
        self.kv_total = Gauge("deltaserve_kv_blocks_total", "KV-cache blocks in the pool.", registry=r)
        # delta residency (slot manager + store host tier)
        self.cache_hits = Counter("deltaserve_delta_cache_hits", "Delta lookups served by a tier.", ["tier"], registry=r)
        self.cache_misses = Counter("deltaserve_delta_cache_misses", "Delta lookups a tier could not serve.",
                                    ["tier"], registry=r)
        self.cache_evictions = Counter("deltaserve_delta_cache_evictions", "Deltas evicted from a tier.",
                                       ["tier"], registry=r)
        self.load_time = Histogram("deltaserve_delta_load_seconds", "Time to bring a delta into a tier.", ["tier"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tier_bytes = Gauge("deltaserve_delta_bytes", "Bytes of deltas resident in a tier.", ["tier"], registry=r)
        self.tier_deltas = Gauge("deltaserve_delta_resident", "Deltas resident in a tier.", ["tier"], registry=r)
        self.slots_used = Gauge("deltaserve_delta_slots_in_use", "Device delta slots holding a delta.", registry=r)
        self.slots_pinned = Gauge("deltaserve_delta_slots_pinned", "Device delta slots pinned by running requests.",
                                  registry=r)
        self.slots_total = Gauge("deltaserve_delta_slots_total", "Device delta slots.", registry=r)
        self.uploads = Counter("deltaserve_uploads", "UploadDelta calls by status.", ["tenant", "status"], registry=r)
        self.upload_bytes = Counter("deltaserve_upload_bytes", "Payload bytes received by UploadDelta.", ["tenant"],
                                    registry=r)
        self.engine_alive = Gauge("deltaserve_engine_alive", "1 while the engine loop runs.", registry=r)

    # ---- edge ---------------------------------------------------------------------------------
    def on_rpc(self, method: str, code) -> None:
        self.rpcs.labels(method, getattr(code, "name", str(code))).inc()

    def request_started(self, tenant: str) -> None:
        self.in_flight.labels(tenant).inc()

    def request_finished(self, tenant: str, status: str, kinds: set[str] | frozenset = frozenset(), *,
                         prompt_tokens: int = 0, completion_tokens: int = 0, queue_time: float | None = None,
                         ttft: float | None = None, total_time: float | None = None) -> None:
        """One Generate call ended (``status`` = ``ok`` or a lower-case gRPC code name)."""
        self.in_flight.labels(tenant).dec()
        self.requests.labels(tenant, status).inc()
        for kind in sorted(kinds) or ["none"]:
            self.requests_by_kind.labels(kind).inc()
        self.prompt_tokens.labels(tenant).inc(prompt_tokens)
        self.generated_tokens.labels(tenant).inc(completion_tokens)
        if queue_time is not None:
            self.queue_wait.labels(tenant).observe(queue_time)
        if ttft is not None:
            self.ttft.labels(tenant).observe(ttft)
        if total_time is not None:
            self.e2e.labels(tenant).observe(total_time)
            if ttft is not None and completion_tokens > 1:
                self.tpot.labels(tenant).observe((total_time - ttft) / (completion_tokens - 1))

    def upload_finished(self, tenant: str, status: str, nbytes: int) -> None:
        self.uploads.labels(tenant, status).inc()
        self.upload_bytes.labels(tenant).inc(nbytes)

    # ---- engine / slots / store stats -----------------------------------------------------------
    def _increase(self, counter, labels: tuple, total: float) -> None:
        """Feed a cumulative count from a stats snapshot into a Counter as an increment."""
        key = (counter._name, labels)
        with self._lock:
            last = self._last.get(key, 0.0)
            self._last[key] = total
        if total > last:
            (counter.labels(*labels) if labels else counter).inc(total - last)

    def record_step(self, step) -> None:
        """One engine step's plain stats (``server/stats.py: StepStats``)."""
        _observe(self.step_time, getattr(step, "step_time", None))
        _observe(self.batch_size, getattr(step, "num_seqs", None))
        _observe(self.batch_tokens, getattr(step, "num_tokens", None))
        _observe(self.step_deltas, getattr(step, "num_deltas", None))
        _set(self.running, getattr(step, "num_running", None))
        _set(self.waiting, getattr(step, "num_waiting", None))
        _set(self.kv_used, getattr(step, "kv_blocks_used", None))
        _set(self.kv_total, getattr(step, "kv_blocks_total", None))

    def record_slots(self, stats) -> None:
        """The slot manager's snapshot (``server/slots.py: SlotStats``): the device tier."""
        _set(self.slots_used, getattr(stats, "used", None))
        _set(self.slots_pinned, getattr(stats, "pinned", None))
        _set(self.slots_total, getattr(stats, "num_slots", None))
        self._record_tier("device", stats)

    def record_store(self, stats) -> None:
        """The store's host-tier snapshot (``delta_store``: host cache stats)."""
        self._record_tier("host", stats)

    def _record_tier(self, tier: str, stats) -> None:
        for counter, attr in ((self.cache_hits, "hits"), (self.cache_misses, "misses"),
                              (self.cache_evictions, "evictions")):
            value = getattr(stats, attr, None)
            if value is not None:
                self._increase(counter, (tier,), float(value))
        _set(self.tier_bytes.labels(tier), getattr(stats, "bytes", None))
        _set(self.tier_deltas.labels(tier), getattr(stats, "resident", None))
        for seconds in getattr(stats, "load_times", None) or ():
            self.load_time.labels(tier).observe(seconds)

    # ---- export ---------------------------------------------------------------------------------
    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int):
        """Start the exposition HTTP server on its own port; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port


def _observe(hist, value) -> None:
    if value is not None:
        hist.observe(value)


def _set(gauge, value) -> None:
    if value is not None:
        gauge.set(value)
