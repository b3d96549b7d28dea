"""Prometheus metrics on a private registry (DESIGN D11, STYLE habit 14).

The engine, the residency owner and the store emit plain stats dataclasses; this is the only module
that imports ``prometheus_client``. Every collector is declared here, named ``deltaserve_*``, and
labelled only by bounded values: tenant, delta kind, cache tier, status, RPC method. Never a delta
id: per-delta usage is served by ``Deltas.GetDelta``, not as one time series per delta. The one
exception is the router view (``vllm:*``, the names the Gateway API Inference Extension reads): its
``vllm:lora_requests_info`` names the resident deltas in label values, as vLLM's does, in one series
that is replaced at every scrape (one name per resident delta).

Source: vLLM ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``), but with a registry per
instance instead of unregistering from the global one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from .engine.stats import RequestStats, StepStats
from .logs import get_logger

log = get_logger("metrics")

# Latency buckets span a 1 ms decode step on a GPU to a 2-minute generation on 2 CPU cores, spaced so that
# histogram_quantile's linear interpolation inside a bucket stays within ~20% of the true quantile: with a
# 0.5-1.0 s bucket a p99 of 0.59 s read as 0.80 s; with 0.5-0.6 it reads within 0.1 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                   1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
# Step and per-token times: 0.5 ms (a GPU decode step) to 2.5 s (a long CPU prefill chunk), the same spacing.
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1,
                0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


ROUTER_METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                  "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info", "vllm:cache_config_info")
"""The series outside ``deltaserve_*``: the Gateway API Inference Extension's endpoint picker reads these
vLLM names (queue, batch, KV usage, resident deltas, KV shape) by default (docs/INTERFACES.md)."""


@dataclass(frozen=True, slots=True)
class RouterView:
    """What a router needs from this replica, read from the engine at scrape time (``App.router_view``)."""

    waiting: int  # requests in the queue
    running: int  # requests in the running batch
    kv_used: int  # KV blocks in use
    kv_total: int
    block_size: int  # tokens per KV block
    resident: tuple[str, ...]  # deltas in device memory, ``name@version``
    waiting_deltas: tuple[str, ...]  # deltas of waiting requests that are not resident
    max_deltas: int  # deltas device memory holds at once


class Metrics:
    def __init__(self) -> None:
        self.registry = r = _Registry()
        self._lock = threading.Lock()
        self._last: dict[tuple, float] = {}  # cumulative counters seen in stats, to turn them into increments
        # requests (from the gRPC edge)
        self.requests = Counter("deltaserve_requests", "Generate calls by final status (ok or a gRPC code name).",
                                ["tenant", "status"], registry=r)
        self.requests_by_kind = Counter("deltaserve_requests_by_delta_kind", "Finished requests by delta kind "
                                        "('base' = no delta).", ["kind"], registry=r)
        self.rpcs = Counter("deltaserve_rpcs", "Every RPC by method and status code.", ["method", "code"], registry=r)
        self.in_flight = Gauge("deltaserve_requests_in_flight", "Generate calls being served.", ["tenant"], registry=r)
        self.e2e = Histogram("deltaserve_request_latency_seconds", "End-to-end Generate latency, arrival to last token.",
                             ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("deltaserve_time_to_first_token_seconds", "Receipt of the request (RPC or HTTP) "
                              "to its first generated token.", ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
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
        self.kv_cached = Gauge("deltaserve_kv_blocks_cached", "Idle KV blocks kept for their content (prefix cache; "
                               "evicted least recently used first when blocks are needed).", registry=r)
        self.prefix_lookups = Counter("deltaserve_prefix_cache_lookups", "Full KV blocks of new or re-admitted "
                                      "requests looked up in the prefix cache.", registry=r)
        self.prefix_hits = Counter("deltaserve_prefix_cache_hits", "Looked-up KV blocks found cached (their "
                                   "prefill was skipped); misses = lookups - hits.", registry=r)
        self.prefix_evictions = Counter("deltaserve_prefix_cache_evictions", "Cached KV blocks reclaimed for new "
                                        "content.", registry=r)
        self.prompt_prefixes = Counter("deltaserve_prompt_prefix_computations", "Shared KV prefixes of prompt/"
                                       "prefix-tuning deltas computed (first use of a version, or after eviction).",
                                       registry=r)
        # delta residency (the device tier's owner + the store's host tier)
        self.cache_hits = Counter("deltaserve_delta_cache_hits", "Delta lookups served by a tier.", ["tier"], registry=r)
        self.cache_misses = Counter("deltaserve_delta_cache_misses", "Delta lookups a tier could not serve.",
                                    ["tier"], registry=r)
        self.cache_evictions = Counter("deltaserve_delta_cache_evictions", "Deltas evicted from a tier.",
                                       ["tier"], registry=r)
        # Loads are reported as running sums by the residency owner and the store, so the mean load time is
        # rate(deltaserve_delta_load_seconds_total) / rate(deltaserve_delta_loads_total), a summary without quantiles.
        self.loads = Counter("deltaserve_delta_loads", "Deltas brought into a tier (device: host/disk -> device "
                             "memory; host: disk -> memory).", ["tier"], registry=r)
        self.load_time = Counter("deltaserve_delta_load_seconds", "Time spent bringing deltas into a tier.", ["tier"],
                                 registry=r)
        self.delta_admissions = Counter("deltaserve_delta_admissions", "Requests with a delta admitted to the batch, "
                                        "by whether it was resident in device memory when first asked (yes: a "
                                        "device hit) or only after waiting for its load (no).", ["resident"],
                                        registry=r)
        self.tier_bytes = Gauge("deltaserve_delta_bytes", "Bytes of deltas resident in a tier.", ["tier"], registry=r)
        self.tier_deltas = Gauge("deltaserve_delta_resident", "Deltas resident in a tier.", ["tier"], registry=r)
        self.tier_budget = Gauge("deltaserve_delta_bytes_budget", "Byte budget of a tier (device: "
                                 "delta_memory_bytes; host: host_cache_bytes).", ["tier"], registry=r)
        self.device_memory = Gauge("deltaserve_delta_device_memory_bytes",
                                   "Device memory of the delta tier: budget (delta_memory_bytes), capacity (arenas "
                                   "allocated), held (by resident deltas, bucketed), real (their own bytes).",
                                   ["state"], registry=r)
        self.device_pinned = Gauge("deltaserve_delta_pinned", "Resident deltas a running request uses.", registry=r)
        self.device_loading = Gauge("deltaserve_delta_loading", "Device loads queued, running or awaiting install.",
                                    registry=r)
        self.device_blocked = Gauge("deltaserve_delta_blocked", "1 while a waiting request's delta waits for memory "
                                    "that running requests' deltas hold.", registry=r)
        self.uploads = Counter("deltaserve_uploads", "UploadDelta calls by status.", ["tenant", "status"], registry=r)
        self.upload_bytes = Counter("deltaserve_upload_bytes", "Payload bytes received by UploadDelta.", ["tenant"],
                                    registry=r)
        self.engine_alive = Gauge("deltaserve_engine_alive", "1 while the engine loop runs.", registry=r)
        self.blobs_damaged = Gauge("deltaserve_blobs_damaged", "Delta blobs this replica found missing or corrupt "
                                   "(their requests fail with DATA_LOSS; re-checked after a minute).", registry=r)
        # The router view: what the Gateway API Inference Extension's endpoint picker scrapes from a model
        # server (its model-server protocol), under the vLLM names it reads by default. Read from the engine
        # at scrape time, so an idle replica does not report its last busy step.
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for admission (the queue).",
                                  registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch.", registry=r)
        self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1 (1 = every block in use).",
                                   registry=r)
        self.vllm_gpu_cache_usage = Gauge("vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc "
                                          "(the name older endpoint pickers read).", registry=r)
        self.vllm_lora_info = Gauge("vllm:lora_requests_info", "Resident deltas (running_lora_adapters), deltas of "
                                    "waiting requests not resident (waiting_lora_adapters), device delta capacity "
                                    "(max_lora); the value is when this was read (Unix seconds).",
                                    ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self.vllm_cache_info = Gauge("vllm:cache_config_info", "KV-cache shape: block_size tokens per block, "
                                     "num_gpu_blocks blocks.", ["block_size", "num_gpu_blocks"], registry=r)

    # ---- edge ---------------------------------------------------------------------------------
    def on_rpc(self, method: str, code) -> None:
        self.rpcs.labels(method, getattr(code, "name", str(code))).inc()

    def request_started(self, tenant: str) -> None:
        """A Generate call reached the engine; ``in_flight`` is decremented when its stream ends."""
        self.in_flight.labels(tenant).inc()

    def request_ended(self, tenant: str) -> None:
        """The engine stream of a call started with :meth:`request_started` ended (any outcome)."""
        self.in_flight.labels(tenant).dec()

    def request_finished(self, tenant: str, status: str, kinds=()) -> None:
        """One Generate call ended at the edge (``status`` = ``ok`` or a lower-case gRPC code name;
        ``kinds``: the delta kinds it used, empty for the base model)."""
        self.requests.labels(tenant, status).inc()
        for kind in sorted(kinds) or ["base"]:
            self.requests_by_kind.labels(kind).inc()

    def upload_finished(self, tenant: str, status: str, nbytes: int) -> None:
        self.uploads.labels(tenant, status).inc()
        self.upload_bytes.labels(tenant).inc(nbytes)

    # ---- engine / residency / store stats -------------------------------------------------------
    def _increase(self, counter, labels: tuple, total: float) -> None:
        """Feed a cumulative count from a stats snapshot into a Counter as an increment."""
        key = (counter._name, labels)
        with self._lock:
            last = self._last.get(key, 0.0)
            self._last[key] = total
        if total > last:
            (counter.labels(*labels) if labels else counter).inc(total - last)

    def record(self, stats) -> None:
        """Engine listener (``engine.add_listener(metrics.record)``): StepStats or RequestStats."""
        if isinstance(stats, StepStats):
            self.record_step(stats)
        elif isinstance(stats, RequestStats):
            self.record_request(stats)

    def record_step(self, step: StepStats) -> None:
        self.step_time.observe(step.step_time)
        self.batch_size.observe(step.num_seqs)
        self.batch_tokens.observe(step.num_tokens)
        self.step_deltas.observe(step.num_deltas)
        self.running.set(step.num_running)
        self.waiting.set(step.num_waiting)
        self.kv_used.set(step.kv_blocks_used)
        self.kv_total.set(step.kv_blocks_total)
        self.kv_cached.set(step.kv_blocks_cached)
        for counter, total in ((self.prefix_lookups, step.prefix_lookups), (self.prefix_hits, step.prefix_hits),
                               (self.prefix_evictions, step.prefix_evictions),
                               (self.prompt_prefixes, step.prompt_prefixes)):
            self._increase(counter, (), float(total))

    def record_request(self, req: RequestStats) -> None:
        """Engine-side timings of one finished request (arrival = when the engine received it)."""
        tenant = req.tenant
        self.prompt_tokens.labels(tenant).inc(req.prompt_tokens)
        self.generated_tokens.labels(tenant).inc(req.completion_tokens)
        self.queue_wait.labels(tenant).observe(req.queue_time)
        self.e2e.labels(tenant).observe(req.e2e)
        if req.ttft is not None:
            self.ttft.labels(tenant).observe(req.ttft)
        if req.tpot is not None:
            self.tpot.labels(tenant).observe(req.tpot)

    def record_residency(self, stats) -> None:
        """The residency owner's snapshot (``server/deltas/residency.py: ResidencyStats``): the device tier."""
        for state in ("budget", "capacity", "held", "real"):
            self.device_memory.labels(state).set(getattr(stats, f"{state}_bytes"))
        self.device_pinned.set(stats.pinned)
        self.device_loading.set(stats.queued + stats.loading + stats.ready)
        self.device_blocked.set(stats.blocked)
        self.tier_deltas.labels("device").set(stats.resident)
        self.tier_bytes.labels("device").set(stats.held_bytes)
        self.tier_budget.labels("device").set(stats.budget_bytes)
        self._tier_counts("device", stats.hits, stats.misses, stats.evictions, stats.loads,
                          stats.load_seconds + stats.install_seconds)

    def record_store(self, stats) -> None:
        """The store's snapshot (``delta_store.store.StoreStats``): the host-memory tier."""
        host = stats.host
        self.tier_bytes.labels("host").set(host.bytes)
        self.tier_deltas.labels("host").set(host.entries)
        self._tier_counts("host", host.hits, host.misses, host.evictions, stats.disk_loads, stats.disk_load_seconds)
        self.blobs_damaged.set(stats.damaged)

    def record_admissions(self, resident: int, waited: int) -> None:
        """The scheduler's running counts of delta admissions (resident at once / after a load)."""
        self._increase(self.delta_admissions, ("yes",), float(resident))
        self._increase(self.delta_admissions, ("no",), float(waited))

    def record_router_view(self, view: RouterView) -> None:
        """The scheduler, KV pool and resident deltas in vLLM's names (one info series, replaced each time)."""
        self.vllm_waiting.set(view.waiting)
        self.vllm_running.set(view.running)
        usage = view.kv_used / view.kv_total if view.kv_total else 0.0
        self.vllm_kv_usage.set(usage)
        self.vllm_gpu_cache_usage.set(usage)
        self.vllm_lora_info.clear()
        self.vllm_lora_info.labels(",".join(view.resident), ",".join(view.waiting_deltas),
                                   str(view.max_deltas)).set(time.time())
        self.vllm_cache_info.clear()
        self.vllm_cache_info.labels(str(view.block_size), str(view.kv_total)).set(1)

    def _tier_counts(self, tier: str, hits, misses, evictions, loads, load_seconds) -> None:
        for counter, total in ((self.cache_hits, hits), (self.cache_misses, misses),
                               (self.cache_evictions, evictions), (self.loads, loads), (self.load_time, load_seconds)):
            self._increase(counter, (tier,), float(total))

    def add_refresh(self, fn) -> None:
        """Call ``fn()`` at every scrape, before the series are read (device- and host-tier snapshots)."""
        self.registry.hooks.append(fn)

    # ---- export ---------------------------------------------------------------------------------
    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int):
        """Start the exposition HTTP server on its own port; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port


class _Registry(CollectorRegistry):
    """A private registry that runs refresh hooks before every collection, so snapshot gauges and
    counters (device and host tiers) are current in the same scrape rather than the next one."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self.hooks = []

    def collect(self):
        for fn in self.hooks:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing snapshot must not break the scrape
                log.error("metrics_refresh_failed", hook=getattr(fn, "__name__", "?"))
        yield from super().collect()
