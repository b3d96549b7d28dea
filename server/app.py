"""Builds a serving process from one ``ServerConfig`` and runs it until SIGTERM.

    model (a local HF folder, or the demo model generated under the data dir) -> memory budgets (memory.py)
      -> wrap_model (deltas/, BaseSpec) -> DeltaStore.open (store_config) -> Residency -> ModelRunner + Engine
      -> Metrics (own HTTP port) -> gRPC server (edge/: Inference, Deltas, Tenants, Health, reflection)

First start with an empty catalogue creates an ``admin`` tenant and writes its key to
``<data_dir>/admin.key`` (mode 0600). SIGTERM/SIGINT: health turns NOT_SERVING, the server stops
accepting calls, in-flight ones get ``grace_seconds`` to finish, then the engine stops and the
process exits 0.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from .config import ServerConfig
from .edge.auth import Authenticator
from .edge.rate_limits import RateLimiter
from .logs import configure, get_logger
from .metrics import Metrics

log = get_logger("app")
KEY_FILE = "admin.key"
ADMIN_TENANT = "admin"
DEVICE_PRELOAD_WAIT_S = 10.0  # a device preload waits this long for the step loop to install the delta


class App:
    """Everything a servicer needs, held together; built by :func:`build_app` (tests may pass fakes)."""

    def __init__(self, config: ServerConfig, *, engine, store, tokenizer, vocab_size: int, residency=None,
                 metrics: Metrics | None = None, budgets=None):
        self.config = config
        self.engine = engine
        self.store = store
        self.residency = residency
        self.budgets = budgets  # memory.Budgets resolved at start-up
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.metrics = metrics or Metrics()
        self.auth = Authenticator(store.tenants)
        self.rate_limiter = RateLimiter()
        self.health = None  # set by create_server
        self.admin_key_file: Path | None = None
        if residency is not None:
            self.metrics.add_refresh(lambda: self.metrics.record_residency(residency.stats()))
        self.metrics.add_refresh(lambda: self.metrics.record_store(store.stats()))
        self.metrics.add_refresh(lambda: self.metrics.engine_alive.set(1 if engine.alive else 0))
        engine.add_listener(self.metrics.record)
        if residency is not None:  # a deleted version's device memory goes as soon as no request uses it
            store.subscribe(lambda gone: [residency.invalidate(v.key) for v in gone])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def ready(self) -> bool:
        return bool(self.engine.alive)

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
        path = Path(self.config.data_dir) / KEY_FILE
        self.admin_key_file = path
        if self.store.tenants.list():
            return None
        _tenant, key = self.store.tenants.create(ADMIN_TENANT, is_admin=True)  # the default quotas
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        log.info("admin_created", tenant=ADMIN_TENANT, key_file=str(path))
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
                             default_quotas=quotas, pin_host_memory=pin_host_memory)
    limits = Limits(max_rank=config.max_rank, max_bottleneck=config.max_bottleneck, device_bytes=device_bytes,
                    device_budget_bytes=device_budget_bytes)
    return limits, settings


def build_app(config: ServerConfig) -> App:
    """Load the model and build every part (synchronous: run it before the event loop serves)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from delta_store.store import DeltaStore

    from .deltas import wrap_model
    from .deltas.residency import Residency
    from .demo import ensure_demo_model
    from .engine import Engine, ModelRunner
    from .engine.kv_cache import kv_layout_for
    from .memory import resolve

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
    layout = kv_layout_for(model.config, config.kv_block_size, 1, dtype)
    budgets = resolve(config, device, kv_block_bytes=layout.bytes_per_block(dtype))  # ConfigError: one line
    # max_slots sizes the step's index buffers: one delta per running sequence at most
    dm = wrap_model(model, targets=config.target_modules, max_slots=config.max_running, max_rank=config.max_rank,
                    max_bottleneck=config.max_bottleneck, max_tokens=config.max_batch_tokens)
    spec = dm.spec  # fingerprinted once, from the unwrapped base
    cuda = device.type == "cuda"
    store = DeltaStore.open(data_dir, spec, *store_config(
        config, pin_host_memory=cuda, device_bytes=lambda d: dm.footprint(d) + dm.slot_bytes,
        device_budget_bytes=budgets.delta_bytes))
    residency = Residency(dm, store.load_key, budgets.delta_bytes, pin_memory=cuda)
    engine = Engine(config, ModelRunner(dm, tokenizer, config, kv_bytes=budgets.kv_bytes), residency)
    log.info("model_loaded", path=str(model_path), model_type=spec.model_type, layers=spec.num_layers,
             fingerprint=spec.fingerprint, torch_threads=threads, delta_memory_bytes=budgets.delta_bytes,
             kv_blocks=engine.runner.kv.num_blocks, free_bytes=budgets.free_bytes, seconds=time.monotonic() - t0)
    return App(config, engine=engine, store=store, tokenizer=tokenizer, vocab_size=spec.vocab_size,
               residency=residency, budgets=budgets)


async def run(app: App, stop: asyncio.Event, announce=print) -> None:
    """Serve until ``stop`` is set, then drain: NOT_SERVING, refuse new calls, finish in-flight ones."""
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
    log.info("draining", grace_seconds=app.config.grace_seconds)
    await app.health.drain()
    # server.stop(grace) refuses new calls at once and cancels what is still running after `grace`;
    # the engine's own shutdown then aborts anything left (there should be nothing).
    await server.stop(app.config.grace_seconds)
    await app.engine.shutdown(0.0)
    metrics_server.shutdown()
    if app.residency is not None:
        app.residency.close()
    app.store.close()
    log.info("stopped")


def serve(config: ServerConfig) -> int:
    """``deltaserve serve``: build, serve, exit 0 after a clean SIGTERM drain."""
    configure(config.log_level)
    app = build_app(config)
    app.ensure_admin()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(app, stop, announce=lambda line: print(line, flush=True))

    asyncio.run(main())
    print("deltaserve stopped", file=sys.stderr, flush=True)
    return 0
