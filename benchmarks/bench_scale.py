"""Delta scale: N distinct deltas served by one real server over gRPC, against 32 deltas and the base model alone.

    python benchmarks/bench_scale.py --quick    # N = 500 on DESIGN's CPU model (hidden 1024, 4 layers), < 6 min
    python benchmarks/bench_scale.py            # N = 2,000

What it does, in order:
  1. starts ``python -m server serve`` (default memory budgets: ``server/memory.py``) on a random Llama of
     DESIGN's CPU shape, and meanwhile builds the deltas: ranks 4-64 LoRA on q/k/v/o, a bottleneck adapter,
     BitFit and (IA)3 (``load/payloads.py`` SCALE_MIX), each distinct;
  2. uploads all N over UploadDelta (built and sent a few at a time: N payloads are never all in memory) and
     preloads each to the device (PreloadDelta, CACHE_TIER_DEVICE), then reads the server's delta memory
     gauges: bytes held by the resident deltas against their real size, the budget and the arenas;
  3. replays open-loop Poisson plans (``load/workload.py``; arrivals at ``sat_factor`` x the base capacity
     measured by a burst) from a separate process (``load/driver.py``): per round, the base model alone, then
     for uniform and zipf (alpha 1) popularity the same arrivals, prompts and lengths over 32 deltas and over
     all N, then the base again. Ratios are tokens/s of one phase over another in the same round; the
     reported ``ratio_many_vs_32`` and ``ratio_many_vs_base`` are the lower of the two popularities, medians
     over rounds; ``device_hit_rate`` is the device tier's hits / (hits + misses) over the N phases;
  4. starts a second server, with the default config, on a random model of SmolLM2-135M's shape (hidden 576,
     intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, fp32, 538 MB) and reads its RSS once it
     announces its ports: the memory a new user's server holds before any delta (target: weights x 1.1 + 512 MB).

One JSON line per phase in benchmarks/results/bench_scale-<date>.jsonl; the last line printed is
``summary: num_deltas=... ratio_many_vs_32=... ratio_many_vs_base=... device_hit_rate=... bytes_per_delta_vs_real=...
startup_rss_mb=... weights_mb=... errors=0`` (targets, reported not asserted: ratio_many_vs_32 >= 0.90,
bytes_per_delta_vs_real <= 1.25).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from load.server_proc import ServerProcess, cuda_present  # noqa: E402  (stdlib only: imports no triton)

if not cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)

from common import Results  # noqa: E402
from load.driver import LoadDriver  # noqa: E402
from load.models import build_model  # noqa: E402
from load.phases import PhaseRunner  # noqa: E402
from load.prom import scrape  # noqa: E402
from load.record import CALL_TIMEOUT_S, GENEROUS_QUOTAS  # noqa: E402
from load.workload import DeltaRef, PlannedRequest, WorkloadConfig, as_base, fresh_prompts, make_plan  # noqa: E402
from server.client import AsyncClient  # noqa: E402

UPLOAD_CONCURRENCY = 4
PRELOAD_CONCURRENCY = 8
POPULARITIES = ("uniform", "zipf")


@dataclass(slots=True)
class ScaleSettings:
    num_deltas: int = 2000
    few: int = 32  # the comparison: the same server with this many deltas in use
    tenants: int = 4
    shape: str = "cpu"
    sat_factor: float = 3.0
    duration_s: float = 10.0
    max_requests: int = 64
    rounds: int = 2
    zipf_s: float = 1.0
    hard_timeout_s: float = 300.0
    rss_shape: str = "smollm2-135m"
    server: dict = field(default_factory=lambda: {"max_bottleneck": 64, "grace_seconds": 5.0})
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_deltas < self.few or self.few < 2:
            raise ValueError(f"num_deltas ({self.num_deltas}) must be >= few ({self.few}) >= 2")


QUICK = ScaleSettings(num_deltas=500, duration_s=8.0, max_requests=40, rounds=1)
FULL = ScaleSettings()


def with_deltas(plan: list[PlannedRequest], refs: list[DeltaRef], popularity: str, zipf_s: float,
                seed: int) -> list[PlannedRequest]:
    """The same arrivals, prompts and lengths, each request on a delta drawn from ``refs`` by ``popularity``."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** zipf_s for k in range(len(refs))] if popularity == "zipf" else None
    out = []
    for p in plan:
        ref = rng.choices(refs, weights=weights)[0]
        out.append(replace(p, tenant=ref.tenant, delta=ref.name, kind=ref.kind))
    return out


# ---- setup over gRPC ----------------------------------------------------------------------------
async def create_tenants(address: str, admin_key: str, names: list[str]) -> list[str]:
    async with AsyncClient(address, admin_key, timeout=CALL_TIMEOUT_S) as c:
        return [(await c.create_tenant(n, quotas=GENEROUS_QUOTAS))[1] for n in names]


async def upload_all(address: str, keys: list[str], refs: list[DeltaRef], factory, seed: int) -> dict:
    """Build each payload on a thread and upload it, UPLOAD_CONCURRENCY at a time (payloads are dropped once sent)."""
    sem = asyncio.Semaphore(UPLOAD_CONCURRENCY)
    peft_lock = threading.Lock()  # PEFT recipes re-randomise one cached model per recipe
    t0 = time.perf_counter()
    sizes = []

    def build(ref: DeltaRef, k: int):
        if factory_method(ref.kind) == "native":
            return factory.build(ref.kind, seed=seed + k)
        with peft_lock:
            return factory.build(ref.kind, seed=seed + k)

    async with AsyncClient(address, timeout=CALL_TIMEOUT_S) as c:
        async def one(k: int, ref: DeltaRef):
            async with sem:
                p = await asyncio.to_thread(build, ref, k)
                v = await c.with_key(keys[ref.tenant]).upload(ref.name, p.data, description=p.recipe,
                                                               labels={"recipe": p.recipe})
                sizes.append(v.size_bytes)
        await asyncio.gather(*(one(k, r) for k, r in enumerate(refs)))
    return {"deltas": len(refs), "stored_bytes": sum(sizes), "seconds": time.perf_counter() - t0}


def factory_method(recipe: str) -> str:
    from load.payloads import RECIPES

    return "peft" if RECIPES[recipe]["method"] in ("lora", "ia3", "beft") else "native"


async def preload_all(address: str, keys: list[str], refs: list[DeltaRef]) -> dict:
    from server.pb import deltas_pb2

    sem = asyncio.Semaphore(PRELOAD_CONCURRENCY)
    t0 = time.perf_counter()
    tiers = []
    async with AsyncClient(address, timeout=CALL_TIMEOUT_S) as c:
        async def one(ref: DeltaRef):
            async with sem:
                r = await c.with_key(keys[ref.tenant]).preload_delta(ref.name, device=True)
                tiers.append(r.tier == deltas_pb2.CACHE_TIER_DEVICE)
        await asyncio.gather(*(one(r) for r in refs))
    return {"deltas": len(refs), "on_device": sum(tiers), "seconds": time.perf_counter() - t0}


def memory_gauges(metrics_url: str) -> dict:
    m = scrape(metrics_url)
    out = {state: m.value("deltaserve_delta_device_memory_bytes", state=state)
           for state in ("budget", "capacity", "held", "real")}
    out.update(resident=m.value("deltaserve_delta_resident", tier="device"),
               hits=m.value("deltaserve_delta_cache_hits_total", tier="device"),
               misses=m.value("deltaserve_delta_cache_misses_total", tier="device"),
               evictions=m.value("deltaserve_delta_cache_evictions_total", tier="device"))
    return out


# ---- the real-sized model's memory --------------------------------------------------------------
def startup_rss(data_dir: Path, shape: str) -> dict:
    """RSS of a default-config server on a random model of ``shape`` once it listens (no delta uploaded)."""
    import psutil

    mdir = build_model(data_dir / "rss", shape)
    weights = sum(f.stat().st_size for f in mdir.glob("*.safetensors"))  # fp32 tensors and a small header
    server = ServerProcess(data_dir / "rss-data", {"grace_seconds": 2.0}, model=str(mdir)).start()
    try:
        time.sleep(1.0)  # let the start-up settle (the engine's first idle wait)
        rss = psutil.Process(server.pid).memory_info().rss
    finally:
        server.stop()
    return {"shape": shape, "weights_mb": weights / 2**20, "startup_rss_mb": rss / 2**20,
            "target_mb": weights / 2**20 * 1.1 + 512, "startup_s": server.startup_s}


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 500, one round: under 6 minutes on 2 CPU cores")
    p.add_argument("--num-deltas", type=int, help="distinct deltas uploaded (default 500 quick, 2000 full)")
    p.add_argument("--rounds", type=int, help="rounds of phases")
    p.add_argument("--no-rss", action="store_true", help="skip the real-sized model's start-up memory")
    p.add_argument("--shape", choices=("cpu", "demo", "gpu"), help="served random Llama (default cpu)")
    p.add_argument("--layers", type=int, help="decoder layers of the --shape model")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="server dtype")
    p.add_argument("--requests", type=int, help="most requests per phase")
    p.add_argument("--duration", type=float, help="seconds of arrivals per phase")
    p.add_argument("--out-dir", help="results folder (default benchmarks/results, or BENCH_RESULTS_DIR)")
    args = p.parse_args(argv)
    s = replace(QUICK if args.quick else FULL)
    try:
        s = replace(s, num_deltas=args.num_deltas or s.num_deltas, rounds=args.rounds or s.rounds,
                    shape=args.shape or s.shape, max_requests=args.requests or s.max_requests,
                    duration_s=args.duration or s.duration_s)
    except ValueError as exc:
        p.error(str(exc))
    if args.dtype:
        s.server = {**s.server, "dtype": args.dtype}
    return args, s


def main(argv=None) -> int:
    args, s = parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltaserve-scale-") as tmp:
        data_dir = Path(tmp)
        mdir = build_model(data_dir, s.shape, args.layers)
        server = ServerProcess(data_dir / "data", s.server, model=str(mdir)).launch()
        try:
            from load.payloads import SCALE_MIX, DeltaFactory, recipe_mix

            factory = DeltaFactory(mdir)  # while the server loads the same model
            vocab = factory.spec.vocab_size
            refs = [DeltaRef(i % s.tenants, f"s{i:05d}-{r}", r)
                    for i, r in enumerate(recipe_mix(s.num_deltas, mix=SCALE_MIX))]
            server.wait_ready()
            results = Results(__file__, {**asdict(s), "quick": args.quick,
                                         "model": f"random llama, shape {s.shape}, layers {args.layers or 'default'}",
                                         "kernels": "cpu" if not cuda_present() else "auto"}, out_dir=args.out_dir)
            tag = f"r{int(time.time()) % 100000}"
            keys = asyncio.run(create_tenants(server.address, server.admin_key,
                                              [f"scale-{tag}-t{i}" for i in range(s.tenants)]))
            up = asyncio.run(upload_all(server.address, keys, refs, factory, seed=1000))
            print(f"uploaded {up['deltas']} deltas ({up['stored_bytes'] / 1e6:.0f} MB stored) in {up['seconds']:.0f} s",
                  flush=True)
            pre = asyncio.run(preload_all(server.address, keys, refs))
            mem = memory_gauges(server.metrics_url)
            print(f"preloaded in {pre['seconds']:.0f} s: {mem['resident']:.0f} resident, held {mem['held'] / 1e6:.0f} MB "
                  f"for {mem['real'] / 1e6:.0f} MB of deltas, arenas {mem['capacity'] / 1e6:.0f} MB, budget "
                  f"{mem['budget'] / 1e6:.0f} MB", flush=True)
            with LoadDriver() as driver:
                run = PhaseRunner(results, address=server.address, metrics_url=server.metrics_url, keys=keys,
                                  driver=driver, hard_timeout_s=s.hard_timeout_s, server_pid=server.pid)
                run.add({"phase": "setup", "group": "setup", "server_startup_s": server.startup_s, "upload": up,
                         "preload": pre, "memory": mem})
                burst = WorkloadConfig(rate=1000.0, duration_s=s.duration_s, max_requests=s.max_requests,
                                       popularity="none", vocab_size=vocab, seed=s.seed + 2)
                calib = run.run("calibrate_base", "calibrate", make_plan(burst, refs, base_tenants=s.tenants))
                rate = s.sat_factor * calib["req_per_s"]
                print(f"base capacity ~{calib['req_per_s']:.2f} req/s: arrivals at {rate:.2f} req/s", flush=True)
                cfg = WorkloadConfig(rate=rate, duration_s=s.duration_s, max_requests=s.max_requests,
                                     popularity="uniform", num_deltas=s.few, vocab_size=vocab, seed=s.seed + 3)
                arrivals = make_plan(cfg, refs)
                plans = {"base": as_base(arrivals)}
                for j, pop in enumerate(POPULARITIES):
                    plans[f"{pop}_{s.few}"] = with_deltas(arrivals, refs[:s.few], pop, s.zipf_s, seed=10 + j)
                    plans[f"{pop}_many"] = with_deltas(arrivals, refs, pop, s.zipf_s, seed=20 + j)
                rows: dict[str, list[dict]] = {name: [] for name in plans}
                salts = itertools.count(1)  # each phase its own prompt tokens: no prefix-cache hit across phases

                def plan_of(name: str) -> list[PlannedRequest]:
                    return fresh_prompts(plans[name], next(salts), vocab)

                hits = misses = 0.0
                for rnd in range(s.rounds):
                    rows["base"].append(run.run(f"base_{rnd}a", "throughput", plan_of("base"), num_deltas=0, rate=rate))
                    for pop in POPULARITIES:
                        for which in (str(s.few), "many"):
                            name = f"{pop}_{which}"
                            before = memory_gauges(server.metrics_url)
                            rows[name].append(run.run(f"{name}_{rnd}", "throughput", plan_of(name), popularity=pop,
                                                      num_deltas=s.few if which != "many" else s.num_deltas,
                                                      rate=rate))
                            if which == "many":
                                after = memory_gauges(server.metrics_url)
                                hits += after["hits"] - before["hits"]
                                misses += after["misses"] - before["misses"]
                    rows["base"].append(run.run(f"base_{rnd}b", "throughput", plan_of("base"), num_deltas=0, rate=rate))
            mem_end = memory_gauges(server.metrics_url)
            tracebacks = server.tracebacks
        finally:
            server.stop()
        rss = startup_rss(data_dir, s.rss_shape) if not args.no_rss else {}
        if rss:
            print(f"start-up RSS of a default server on a random {s.rss_shape}: {rss['startup_rss_mb']:.0f} MB for "
                  f"{rss['weights_mb']:.0f} MB of weights (target {rss['target_mb']:.0f} MB)", flush=True)

    def tok(name: str, rnd: int) -> float:
        return rows[name][rnd]["tok_per_s"]

    ratios = {}
    for pop in POPULARITIES:
        ratios[f"{pop}_many_vs_{s.few}"] = statistics.median(tok(f"{pop}_many", r) / tok(f"{pop}_{s.few}", r)
                                                             for r in range(s.rounds))
        ratios[f"{pop}_many_vs_base"] = statistics.median(
            tok(f"{pop}_many", r) / statistics.mean((tok("base", 2 * r), tok("base", 2 * r + 1)))
            for r in range(s.rounds))
        ratios[f"{pop}_{s.few}_vs_base"] = statistics.median(
            tok(f"{pop}_{s.few}", r) / statistics.mean((tok("base", 2 * r), tok("base", 2 * r + 1)))
            for r in range(s.rounds))
    errors = sum(r["errors"] for rs in rows.values() for r in rs) + calib["errors"]
    summary = dict(
        num_deltas=s.num_deltas,
        ratio_many_vs_32=min(ratios[f"{p}_many_vs_{s.few}"] for p in POPULARITIES),
        ratio_many_vs_base=min(ratios[f"{p}_many_vs_base"] for p in POPULARITIES),
        device_hit_rate=hits / (hits + misses) if hits + misses else math.nan,
        bytes_per_delta_vs_real=mem["held"] / mem["real"] if mem["real"] else math.nan,
        startup_rss_mb=rss.get("startup_rss_mb", math.nan), weights_mb=rss.get("weights_mb", math.nan),
        errors=errors, arena_vs_real=mem["capacity"] / mem["real"] if mem["real"] else math.nan,
        resident=int(mem["resident"]), budget_mb=mem["budget"] / 2**20,
        evictions=int(mem_end["evictions"]), server_tracebacks=tracebacks,
        **{k: v for k, v in ratios.items()}, rss_target_mb=rss.get("target_mb", math.nan),
        wall_s=time.perf_counter() - t_start)
    run.add({"phase": "summary", "group": "summary", **summary, "rss": rss, "memory_end": mem_end})
    results.summary(**summary)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
