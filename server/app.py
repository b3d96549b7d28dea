"""Builds a serving process from one ``ServerConfig`` and runs it until SIGTERM.

    model (a local HF folder, or the demo model generated under the data dir)
      -> wrap_model (deltas/, BaseSpec) -> DeltaStore.open (store_config) -> SlotManager -> ModelRunner + Engine
      -> Metrics (own HTTP port) -> gRPC server (edge/: Inference, Deltas, Tenants, Health, reflection)

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
import signal
import sys
import time
from pathlib import Path

from . import admin_key
from .config import ServerConfig
from .edge.auth import Authenticator
from .edge.rate_limits import RateLimiter, UploadSlots
from .logs import configure, get_logger
from .metrics import Metrics

log = get_logger("app")
DEVICE_PRELOAD_WAIT_S = 10.0  # a device preload waits this long for the step loop to install the delta
CUT_SLACK_S = 1.0  # after the drain cuts the last streams, gRPC waits this long for their statuses to go out


class App:
    """Everything a servicer needs, held together; built by :func:`build_app` (tests may pass fakes)."""

    def __init__(self, config: ServerConfig, *, engine, store, tokenizer, vocab_size: int, slots=None,
                 metrics: Metrics | None = None):
        self.config = config
        self.engine = engine
        self.store = store
        self.slots = slots
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.metrics = metrics or Metrics()
        self.auth = Authenticator(store.tenants)
        self.rate_limiter = RateLimiter()
        self.uploads = UploadSlots(config.max_uploads, config.max_uploads_per_tenant)
        # uploads convert on their own threads, so a burst of them never holds the default executor that
        # authenticates and resolves every other call (one thread per upload slot: no queue behind them)
        self.upload_pool = concurrent.futures.ThreadPoolExecutor(config.max_uploads, thread_name_prefix="upload")
        self.running_streams: set[str] = set()  # request ids of Generate streams in flight (the drain cuts them)
        self.cutting = False
        self.health = None  # set by create_server
        self.admin_key_file: Path | None = None
        if slots is not None:
            self.metrics.add_refresh(lambda: self.metrics.record_slots(slots.stats()))
        self.metrics.add_refresh(lambda: self.metrics.record_store(store.stats()))
        self.metrics.add_refresh(lambda: self.metrics.engine_alive.set(1 if engine.alive else 0))
        engine.add_listener(self.metrics.record)
        if slots is not None:  # a deleted version's device slot goes as soon as no request uses it
            store.subscribe(lambda gone: [slots.invalidate(v.key) for v in gone])

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
        """Load ``key`` into a device slot (unpinned, LRU like any other); True once it is installed.

        While requests run, the engine's step loop installs finished loads between forwards. An idle
        engine runs no steps, so then the install happens here: this coroutine runs on the engine's
        event-loop thread, and with no sequence scheduled no forward can be reading the pools.
        """
        if self.slots is None:
            return False
        if self.slots.prefetch(key):
            return True
        deadline = time.monotonic() + DEVICE_PRELOAD_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            if not self.engine.scheduler.has_work():
                self.slots.install_ready()
            if self.slots.slot_of(key) is not None:
                return True
        return False

    def ensure_admin(self) -> Path | None:
        """Create the admin tenant on an empty catalogue; write its key to ``<data_dir>/admin.key`` (0600)."""
        self.admin_key_file = admin_key.key_path(self.config.data_dir)
        if self.store.tenants.list():
            return None
        _tenant, key = self.store.tenants.create(admin_key.ADMIN_TENANT, is_admin=True)  # the default quotas
        path = admin_key.write_key(self.config.data_dir, key)
        log.info("admin_created", tenant=admin_key.ADMIN_TENANT, key_file=str(path))
        return path


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_torch_threads(config: ServerConfig) -> int:
    """Set the process's intra-op CPU threads from ``config.torch_threads`` (0 keeps torch's default) and
    return the count in effect. Before anything runs on the CPU: ops already running keep their pool."""
    import torch

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    return torch.get_num_threads()


def store_config(config: ServerConfig, *, pin_host_memory: bool):
    """The delta store's ``(Limits, StoreSettings)`` from ``config``: the one place they are built, so each
    serving default is written once, in ``ServerConfig``. ``pin_host_memory``: the caller serves on CUDA."""
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
    return Limits(max_rank=config.max_rank, max_bottleneck=config.max_bottleneck), settings


def build_app(config: ServerConfig) -> App:
    """Load the model and build every part (synchronous: run it before the event loop serves)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from delta_store.store import DeltaStore

    from .deltas import SlotManager, wrap_model
    from .demo import ensure_demo_model
    from .engine import Engine, ModelRunner

    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if config.model_path:
        model_path = Path(config.model_path)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_path}: no config.json there (expected an HF model folder)")
    else:
        model_path, created = ensure_demo_model(data_dir)
        log.info("demo_model", path=str(model_path), created=created)
    t0 = time.monotonic()
    threads = apply_torch_threads(config)
    dtype = getattr(torch, config.dtype)
    device = _device(config.device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dm = wrap_model(model, targets=config.target_modules, max_slots=config.max_slots, max_rank=config.max_rank,
                    max_bottleneck=config.max_bottleneck, max_tokens=config.max_batch_tokens)
    spec = dm.spec  # fingerprinted once, from the unwrapped base
    store = DeltaStore.open(data_dir, spec, *store_config(config, pin_host_memory=device.type == "cuda"))
    slots = SlotManager(dm, loader=store.load_key, num_slots=config.max_slots)
    engine = Engine(config, ModelRunner(dm, tokenizer, config), slots)
    log.info("model_loaded", path=str(model_path), model_type=spec.model_type, layers=spec.num_layers,
             fingerprint=spec.fingerprint, torch_threads=threads, seconds=time.monotonic() - t0)
    return App(config, engine=engine, store=store, tokenizer=tokenizer, vocab_size=spec.vocab_size, slots=slots)


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
    log.info("listening", address=f"{grpc_host}:{port}", metrics=f"http://{host}:{metrics_port}/metrics")
    announce(f"deltaserve listening on {grpc_host}:{port}")
    announce(f"metrics: http://{host}:{metrics_port}/metrics")
    if app.admin_key_file is not None and app.admin_key_file.exists():
        announce(f"admin key file: {app.admin_key_file}")
    await stop.wait()
    config = app.config
    log.info("draining", health_grace_seconds=config.health_grace_seconds, grace_seconds=config.grace_seconds)
    await app.health.drain()  # NOT_SERVING; the listener stays open and keeps serving meanwhile
    await _wait(hurry, config.health_grace_seconds, lambda: False)
    # server.stop(grace) refuses new calls at once and cancels what is still running after `grace`. Streams
    # still running when our grace ends are cut here first, so they end with a status that says why; the
    # engine's own shutdown then aborts anything left (there should be nothing).
    stopping = asyncio.create_task(server.stop(config.grace_seconds + CUT_SLACK_S))
    await _wait(None, config.grace_seconds, lambda: not app.running_streams)
    if app.running_streams:
        log.info("drain_cut", streams=app.cut_streams())
    await stopping
    await app.engine.shutdown(0.0)
    await asyncio.to_thread(app.upload_pool.shutdown, True)  # conversions of cut uploads end first
    metrics_server.shutdown()
    if app.slots is not None:
        app.slots.close()
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
