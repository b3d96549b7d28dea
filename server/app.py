"""Builds a serving process from one ``ServerConfig`` and runs it until SIGTERM.

    model (server/models: the embedded SmolLM2 default, the demo model, an HF folder or a .gguf file)
      -> memory budgets (memory.py) -> wrap_model (deltas/, BaseSpec) -> DeltaStore.open (store_config)
      -> Residency -> ModelRunner + Engine
      -> Metrics (own HTTP port) -> gRPC server (edge/: Inference, Deltas, Tenants, Health, reflection)
      -> OpenAI-compatible HTTP front (edge/openai_http.py: own port, same event loop)

First start with an empty catalogue creates an ``admin`` tenant and writes its key to
``<data_dir>/admin.key`` (mode 0600, ``server/admin_key.py``). SIGTERM/SIGINT drains in three steps:
health turns NOT_SERVING and stays so for ``health_grace_seconds`` while the listener still serves (a
Kubernetes readiness probe sees the drain and the endpoint is removed before anything is refused); then
the listener closes and running calls get ``grace_seconds`` to finish; streams still running then are
ended UNAVAILABLE "server shutting down" (retryable, and named so by the CLI). The engine stops and the
process exits 0. A second signal skips what is left of the health grace.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

from delta_store.errors import AlreadyExists

from . import admin_key, discovery
from .config import ServerConfig
from .edge.auth import Authenticator
from .edge.generation import CUT_SLACK_S
from .edge.rate_limits import RateLimiter, UploadSlots
from .logs import configure, get_logger
from .metrics import Metrics, RouterView
from .storage import describe_blobs, open_blobs, open_catalogue, replica_id

log = get_logger("app")
DEVICE_PRELOAD_WAIT_S = 10.0  # a device preload waits this long for the step loop to install the delta


class App:
    """Everything a servicer needs, held together; built by :func:`build_app` (tests may pass fakes)."""

    def __init__(self, config: ServerConfig, *, engine, store, tokenizer, vocab_size: int, residency=None,
                 metrics: Metrics | None = None, budgets=None, model_name: str = "base", generation_defaults=None,
                 chat=None, merges=None):
        self.config = config
        self.model_name = model_name  # the base model's served name (OpenAI `model`, /v1/models)
        self.generation_defaults = generation_defaults  # server/models/generation.py: GenerationDefaults | None
        self.chat = chat  # server/models/chat.py: ChatFormat, or None when the model has no chat template
        self.merges = merges  # server.deltas.merges.MergeCache (GenerateRequest.merge)
        self.engine = engine
        self.store = store
        self.residency = residency
        self.budgets = budgets  # memory.Budgets resolved at start-up
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.metrics = metrics or Metrics()
        self.auth = Authenticator(store.tenants)
        self.rate_limiter = RateLimiter()
        self.uploads = UploadSlots(config.max_uploads, config.max_uploads_per_tenant)
        # uploads convert on their own threads, so a burst of them never holds the default executor that
        # authenticates and resolves every other call (one thread per upload slot: no queue behind them)
        self.upload_pool = concurrent.futures.ThreadPoolExecutor(config.max_uploads, thread_name_prefix="upload")
        self.running_streams: set[str] = set()  # request ids of generation streams in flight (the drain cuts them)
        self.draining = False  # SIGTERM seen: health answers NOT_SERVING (gRPC) / 503 (HTTP) from then on
        self.cutting = False
        self.replica_id = replica_id(config)  # x-deltaserve-replica on every response
        self.health = None  # set by create_server
        self.openai_front = None  # set by run() when config.openai_listen is set
        self.admin_key_file: Path | None = None
        if residency is not None:
            self.metrics.add_refresh(lambda: self.metrics.record_residency(residency.stats()))
        self.metrics.add_refresh(lambda: self.metrics.record_store(store.stats()))
        self.metrics.tier_budget.labels("host").set(config.host_cache_bytes)
        self.metrics.add_refresh(lambda: self.metrics.engine_alive.set(1 if engine.alive else 0))
        if residency is not None:
            self.metrics.add_refresh(lambda: self.metrics.record_router_view(self.router_view()))
            sched = engine.scheduler
            self.metrics.add_refresh(lambda: self.metrics.record_admissions(sched.delta_admissions_resident,
                                                                            sched.delta_admissions_waited))
        engine.add_listener(self.metrics.record)
        if residency is not None:  # a deleted version's device memory goes as soon as no request uses it
            store.subscribe(lambda gone: [residency.invalidate(v.key) for v in gone])
        if residency is not None and merges is not None:  # and so does that of the merges that used it
            store.subscribe(lambda gone: [residency.invalidate(k) for v in gone for k in merges.forget(v.key)])

    def router_view(self) -> RouterView:
        """Queue, batch, KV pool and resident deltas, read now (from the metrics thread: copies only)."""
        sched, kv = self.engine.scheduler, self.engine.runner.kv
        resident = self.residency.resident()
        waiting = {s.request.delta for queue in list(sched.waiting.values()) for s in list(queue)}
        waiting.discard(None)
        # max_deltas: vLLM's max_loras, the most distinct deltas one step serves; how many are resident follows
        # from their sizes and the byte budget (D13), so there is no fixed count of resident deltas to report
        return RouterView(sched.num_waiting, sched.num_running, kv.allocator.num_used, kv.allocator.num_blocks,
                          kv.block_size, tuple(sorted({f"{k.name}@{k.version}" for k in resident})),
                          tuple(sorted({f"{k.name}@{k.version}" for k in waiting - set(resident)})),
                          self.residency.dm.max_slots)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def ready(self) -> bool:
        return bool(self.engine.alive)

    def cut_streams(self) -> int:
        """End every Generate stream still running (the drain's grace is over): each one's handler answers
        UNAVAILABLE "server shutting down" instead of being cancelled by gRPC mid-stream."""
        self.cutting = True
        cut = [rid for rid in list(self.running_streams) if self.engine.abort(rid)]
        return len(cut)

    async def preload_device(self, key) -> bool:
        """Make ``key`` resident on the device (unpinned, LRU like any other); True once it is, False if it is
        still on its way after DEVICE_PRELOAD_WAIT_S. The step loop installs it between forwards, busy or idle
        (an idle engine steps while a load is pending). A failed load raises its error."""
        if self.residency is None:
            return False
        future = self.residency.request(key, notify=True)
        self.engine.wake()
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), DEVICE_PRELOAD_WAIT_S)
        except asyncio.TimeoutError:
            return False
        except asyncio.CancelledError:
            if future.cancelled():  # the version was deleted meanwhile
                return False
            raise
        return True

    def ensure_admin(self) -> Path | None:
        """Create the admin tenant on an empty catalogue; write its key to ``<data_dir>/admin.key`` (0600)."""
        self.admin_key_file = admin_key.key_path(self.config.data_dir)
        if self.store.tenants.list():
            return None
        try:
            _tenant, key = self.store.tenants.create(admin_key.ADMIN_TENANT, is_admin=True)  # the default quotas
        except AlreadyExists:  # another replica of a shared catalogue created it first: its data dir has the key
            log.info("admin_exists", tenant=admin_key.ADMIN_TENANT)
            return None
        path = admin_key.write_key(self.config.data_dir, key)
        log.info("admin_created", tenant=admin_key.ADMIN_TENANT, key_file=str(path))
        return path


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_torch_threads(config: ServerConfig) -> int:
    """Set the process's intra-op CPU threads from ``config.torch_threads`` (0: ``auto_torch_threads``) and
    return the count in effect. Before anything runs on the CPU: ops already running keep their pool."""
    import torch

    torch.set_num_threads(config.torch_threads or auto_torch_threads(torch.get_num_threads()))
    return torch.get_num_threads()


def auto_torch_threads(default: int) -> int:
    """torch's ``default`` intra-op count, capped at the process's CPUs less one: that one is the server's event
    loop's (gRPC, HTTP, detokenizing, metrics) beside the step thread's pool; at least 1. Why: each op torch
    splits ends in a barrier, and a pool as wide as the machine waits at its barriers for the pool thread the
    event loop descheduled, while the delta ops run on one thread anyway (``kernels/cpu/threads.py``).
    bench_serving --quick on 2 shared cores, runs interleaved, one thread against torch's 2: demo model 32 deltas
    19-25 against 17-22 req/s and base 24-35 against 20-28 (ratio 0.76-0.85, median 0.80, against 0.77-0.79);
    CPU shape 32 deltas 157-174 against 157-158 tok/s on a third less server CPU (0.926 against 0.873), base
    168-178 against 157-221, median TPOT lower in three of four latency phases
    (benchmarks/results/bench_serving-ab-threads-2026-12-02.jsonl)."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on (a container's cpuset)
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(default, cpus - 1))


def native_loops(device) -> str:
    """Build (or load) the CPU backend's C loops now, not in the first step (~0.3 s with a compiler): "on", "off"
    (``DELTASERVE_CPU_NATIVE=off``, or no compiler: the torch plans serve) or "-" (the ops run on Triton).
    ``DELTASERVE_CPU_NATIVE=on`` with nothing to build them is a ConfigError (one line)."""
    import torch

    import kernels
    from kernels.cpu import native

    from .config import ConfigError

    if kernels.current_backend(torch.empty(0, device=device)) != "cpu":
        return "-"
    try:
        return "on" if native.library() is not None else "off"
    except (native.NativeUnavailable, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def store_config(config: ServerConfig, *, pin_host_memory: bool, device_bytes=None, device_budget_bytes: int = 0):
    """The delta store's ``(Limits, StoreSettings)`` from ``config``: the one place they are built, so each
    serving default is written once, in ``ServerConfig``. ``pin_host_memory``: the caller serves on CUDA;
    ``device_bytes`` (``DeltaModel.footprint``) and ``device_budget_bytes`` (the delta budget): an upload whose
    footprint exceeds the whole budget is refused at once, never at serve time."""
    from delta_store.records import TenantQuotas
    from delta_store.settings import StoreSettings
    from delta_store.validate import Limits

    quotas = TenantQuotas(max_deltas=config.default_max_deltas, max_bytes=config.default_max_delta_bytes,
                          requests_per_minute=config.default_requests_per_minute,
                          tokens_per_minute=config.default_tokens_per_minute,
                          max_concurrent=config.default_max_concurrent)
    settings = StoreSettings(host_cache_bytes=config.host_cache_bytes, max_upload_bytes=config.max_upload_bytes,
                             default_quotas=quotas, pin_host_memory=pin_host_memory,
                             max_archive_bytes=config.max_archive_bytes, max_archive_ratio=config.max_archive_ratio)
    limits = Limits(max_rank=config.max_rank, max_bottleneck=config.max_bottleneck,
                    max_token_rows=config.max_token_rows, max_model_len=config.max_model_len,
                    device_bytes=device_bytes, device_budget_bytes=device_budget_bytes)
    return limits, settings


def build_app(config: ServerConfig) -> App:
    """Load the model and build every part (synchronous: run it before the event loop serves)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from delta_store.store import DeltaStore

    from transformers.utils import logging as hf_logging

    from .deltas import wrap_model
    from .deltas.merges import MergeCache, loader
    from .deltas.residency import Residency
    from .engine import Engine, ModelRunner
    from .engine.kv_cache import kv_layout_for
    from .memory import resolve
    from .models import resolve_model
    from .models.chat import ChatFormat
    from .models.generation import GenerationDefaults, model_max_len

    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    device = _device(config.device)
    limits, settings = store_config(config, pin_host_memory=device.type == "cuda")
    # The shared services first: a replica that cannot reach them stops in seconds, not after the model load.
    catalogue = open_catalogue(config, settings.busy_timeout_s)
    blobs = open_blobs(config)
    source = resolve_model(config.model_path, data_dir)
    t0 = time.monotonic()
    threads = apply_torch_threads(config)
    dtype = getattr(torch, config.dtype)
    if not sys.stderr.isatty():  # "Loading weights" bars only on a terminal; a server log stays one line per event
        hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    defaults = GenerationDefaults.from_folder(source.path) if config.generation_config == "auto" else None
    chat = ChatFormat.from_tokenizer(tokenizer, defaults.eos_token_ids if defaults else ())
    layout = kv_layout_for(model.config, config.kv_block_size, 1, dtype)
    budgets = resolve(config, device, kv_block_bytes=layout.bytes_per_block(dtype))  # ConfigError: one line
    # max_slots sizes the step's index buffers: one delta per running sequence at most
    dm = wrap_model(model, targets=config.target_modules, max_slots=config.max_running, max_rank=config.max_rank,
                    max_bottleneck=config.max_bottleneck, max_tokens=config.max_batch_tokens,
                    max_token_rows=config.max_token_rows)
    spec = dm.spec  # fingerprinted once, from the unwrapped base
    loops = native_loops(device)
    # an upload whose footprint exceeds the whole delta budget is refused at once, never at serve time
    limits = dataclasses.replace(limits, device_bytes=lambda d: dm.footprint(d) + dm.slot_bytes,
                                 device_budget_bytes=budgets.delta_bytes)
    store = DeltaStore.open(data_dir, spec, limits, settings, blobs=blobs, catalogue=catalogue)
    merges = MergeCache(store.load_key, max_rank=config.max_rank, max_bytes=config.merge_cache_bytes)
    residency = Residency(dm, loader(merges, store.load_key), budgets.delta_bytes, pin_memory=device.type == "cuda")
    runner = ModelRunner(dm, tokenizer, config, kv_bytes=budgets.kv_bytes)
    config = with_max_model_len(config, model_max_len(model.config), runner.kv.num_blocks * config.kv_block_size)
    engine = Engine(config, runner, residency)
    log.info("model_loaded", model=source.name, origin=source.origin, path=str(source.path),
             model_type=spec.model_type, layers=spec.num_layers, fingerprint=spec.fingerprint,
             chat_template=chat is not None, sampling_defaults=",".join(
                 f"{k}={v}" for k, v in (defaults.sampling_fields() if defaults else {}).items()) or "-",
             torch_threads=threads, native_loops=loops, delta_memory_bytes=budgets.delta_bytes,
             kv_blocks=runner.kv.num_blocks,
             free_bytes=budgets.free_bytes, seconds=time.monotonic() - t0)
    log.info("storage", catalogue=catalogue.where, revision=catalogue.revision, blobs=describe_blobs(blobs),
             replica=replica_id(config))
    return App(config, engine=engine, store=store, tokenizer=tokenizer, vocab_size=spec.vocab_size,
               residency=residency, budgets=budgets, model_name=source.name, generation_defaults=defaults, chat=chat,
               merges=merges)


def with_max_model_len(config: ServerConfig, model_limit: int | None, kv_tokens: int) -> ServerConfig:
    """``config`` with max_model_len resolved: 0 means the model's own limit (``max_position_embeddings``;
    2048 when the config has none); either way capped by what the KV cache holds, since a longer
    sequence could never be scheduled. The value and why are logged once."""
    requested = config.max_model_len
    value = requested or model_limit or 2048
    if requested and model_limit and requested > model_limit:
        log.warning("max_model_len_above_model_limit", max_model_len=requested, model_limit=model_limit)
    capped = value > kv_tokens
    value = min(value, kv_tokens)
    log.info("max_model_len", value=value, requested=requested or "auto", model_limit=model_limit or "-",
             kv_cache_tokens=kv_tokens, capped_by_kv=capped)
    return dataclasses.replace(config, max_model_len=value)


async def run(app: App, stop: asyncio.Event, announce=print, hurry: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set, then drain: NOT_SERVING for the health grace (``hurry`` set: at once),
    close the listener, let running calls finish for ``grace_seconds``, cut the streams still running."""
    from .edge.grpc_server import create_server

    await app.engine.start()
    server, port = create_server(app)
    await app.health.start()  # before the first call can arrive: the servicer starts out saying SERVING
    await server.start()
    host, _, mport = app.config.metrics_listen.rpartition(":")
    metrics_server, metrics_port = app.metrics.serve(host.strip("[]"), int(mport))
    grpc_host = app.config.listen.rpartition(":")[0]
    front, openai_url = None, "-"
    if app.config.openai_listen:
        from .edge.openai_http import OpenAIFront

        front = app.openai_front = OpenAIFront(app)
        openai_port = await front.start(app.config.openai_listen)
        openai_url = f"http://{app.config.openai_listen.rpartition(':')[0]}:{openai_port}/v1"
    log.info("listening", address=f"{grpc_host}:{port}", metrics=f"http://{host}:{metrics_port}/metrics",
             openai=openai_url, model=app.model_name)
    announce(f"deltaserve listening on {grpc_host}:{port}")
    announce(f"metrics: http://{host}:{metrics_port}/metrics")
    if front is not None:
        announce(f"openai: {openai_url}")
    if app.admin_key_file is not None and app.admin_key_file.exists():
        announce(f"admin key file: {app.admin_key_file}")
    note = discovery.announce(port, f"{grpc_host}:{port}", app.config.data_dir, openai_url)
    await stop.wait()
    discovery.withdraw(note)
    config = app.config
    log.info("draining", health_grace_seconds=config.health_grace_seconds, grace_seconds=config.grace_seconds)
    app.draining = True  # the OpenAI front's /health answers 503 from here
    await app.health.drain()  # NOT_SERVING; both listeners stay open and keep serving meanwhile
    await _wait(hurry, config.health_grace_seconds, lambda: False)
    # server.stop(grace) refuses new calls at once and cancels what is still running after `grace` (the
    # OpenAI front likewise). Streams still running when our grace ends are cut here first, so they end with
    # a status that says why; the engine's own shutdown then aborts anything left (there should be nothing).
    stopping = asyncio.gather(server.stop(config.grace_seconds + CUT_SLACK_S),
                              front.stop() if front else asyncio.sleep(0))
    await _wait(None, config.grace_seconds, lambda: not app.running_streams)
    if app.running_streams:
        log.info("drain_cut", streams=app.cut_streams())
    await stopping
    await app.engine.shutdown(0.0)
    await asyncio.to_thread(app.upload_pool.shutdown, True)  # conversions of cut uploads end first
    metrics_server.shutdown()
    if app.residency is not None:
        app.residency.close()
    app.store.close()
    log.info("stopped")


async def _wait(event: asyncio.Event | None, seconds: float, done) -> None:
    """Up to ``seconds``, until ``event`` is set or ``done()`` is true (polled every 10 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done() and not (event is not None and event.is_set()):
        await asyncio.sleep(min(0.01, max(0.0, deadline - time.monotonic())))


def serve(config: ServerConfig) -> int:
    """``deltaserve serve``: build, serve, exit 0 after a clean SIGTERM drain (a second signal hurries it)."""
    configure(config.log_level)
    app = build_app(config)
    app.ensure_admin()

    async def main() -> None:
        stop, hurry = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            (hurry if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await run(app, stop, announce=lambda line: print(line, flush=True), hurry=hurry)

    asyncio.run(main())
    print("deltaserve stopped", file=sys.stderr, flush=True)
    return 0
