"""End-to-end serving benchmark: the real server over real gRPC, deltas against the base model alone
in the same run.

    python benchmarks/bench_serving.py --quick          # CPU, demo model, under 3 minutes
    python benchmarks/bench_serving.py [--shape cpu]    # the full grid (hidden 1024 with --shape cpu)
    python benchmarks/bench_serving.py --server HOST:PORT --api-key ADMIN_KEY [--metrics-url URL]

What it does, in order:
  1. starts ``python -m server serve`` on a temp data dir, both ports picked free on 127.0.0.1
     (or targets ``--server``, whose key must be an admin's: it creates its own tenants);
  2. creates tenants over gRPC and uploads a mix of real deltas through UploadDelta: PEFT LoRA at
     ranks 4-64 on some or all projections (one with a bias term), (IA)3, BEFT, and native
     bottleneck adapters and BitFit biases (``load/payloads.py``);
  3. from a separate process (``load/driver.py``), replays open-loop Poisson plans over grpc.aio:
     - saturation phases, arrivals at ``sat_factor`` x the base capacity (measured by a burst):
       rounds of 1..32 distinct deltas under uniform popularity, every round bracketed by phases
       of the base model alone with the same arrivals and lengths; each ratio is taken against the
       mean of its two brackets, and the median over rounds is reported. Every phase draws its own
       prompt tokens (``fresh_prompts``): with the same tokens the server's prefix cache would hand a
       repeated phase the KV of an earlier one and skip its prefill;
     - latency phases, arrivals at ``lat_factor`` x the throughput sustained with the most deltas,
       so that every configuration keeps up: base alone, then uniform, zipf and one-hot-tenant
       popularity, each with ``cold_fraction`` of requests on never-seen deltas uploaded just
       before the phase;
  4. scrapes the server's Prometheus endpoint before and after each phase and cross-checks the
     client's counts and mean latencies against the server's histograms (``load/report.py``);
  5. writes one JSON line per phase to ``benchmarks/results/bench_serving-<date>.jsonl``, draws the
     plots (``plot.py``) and prints ``summary: ...`` last. Exit status 1 if a request failed or the
     metrics disagree (the figures are then not trustworthy), else 0.

Targets reported, not asserted: with 32 distinct deltas under uniform popularity, throughput at
least 0.80 of the base model alone; TTFT p99 of cold-delta requests within 2x of warm ones.
Everything is bounded: request counts and arrival windows per phase, a hard per-request timeout,
and a bound on every wait for the load process and the server.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from load.server_proc import ServerProcess, cuda_present  # noqa: E402  (stdlib only: imports no triton)

if not cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)

from common import Results  # noqa: E402
from server.client import AsyncClient  # noqa: E402
from load.driver import LoadDriver  # noqa: E402
from load.models import build_model  # noqa: E402
from load.phases import PhaseRunner  # noqa: E402
from load.record import CALL_TIMEOUT_S, GENEROUS_QUOTAS  # noqa: E402
from load.report import percentile  # noqa: E402
from load.workload import (OUTPUT_LEN, PROMPT_LEN, DeltaRef, LengthDist, WorkloadConfig, as_base,  # noqa: E402
                           fresh_prompts, make_plan)

POPULARITIES = ("uniform", "zipf", "hot")
UPLOAD_CONCURRENCY = 4  # parallel UploadDelta streams: enough to overlap client and server work on 2 cores


@dataclass(slots=True)
class BenchSettings:
    tenants: int = 4
    sweep: tuple[int, ...] = (1, 8, 32)  # distinct deltas in the saturation phases
    latency_deltas: int = 32  # warm deltas in the latency phases
    sat_factor: float = 3.0  # saturation arrivals = this x the base capacity measured by a burst
    lat_factor: float = 0.6  # latency arrivals = this x the throughput sustained with max(sweep) deltas
    sat_duration_s: float = 8.0
    sat_max_requests: int = 48
    sat_repeats: int = 3  # rounds of the sweep, each bracketed by base phases: the median of 3 drops one noisy bracket
    lat_duration_s: float = 8.0
    lat_max_requests: int = 60
    cold_fraction: float = 0.15
    prompt_len: LengthDist = PROMPT_LEN
    output_len: LengthDist = OUTPUT_LEN
    hard_timeout_s: float = 120.0
    server: dict = field(default_factory=lambda: {"max_bottleneck": 64, "kv_blocks": 4096, "grace_seconds": 5.0})
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tenants < 2:
            raise ValueError(f"tenants must be >= 2 (one hot tenant and others), got {self.tenants}")
        if not self.sweep or min(self.sweep) < 1:
            raise ValueError(f"sweep must list numbers of deltas >= 1, got {self.sweep}")
        if self.latency_deltas < 2:
            raise ValueError(f"latency phases need >= 2 deltas (the hot tenant's and another's), got "
                             f"{self.latency_deltas}: put a number >= 2 in --sweep")
        if not (self.sat_factor > 0 and self.lat_factor > 0) or self.sat_repeats < 1:
            raise ValueError(f"sat_factor, lat_factor must be > 0 and sat_repeats >= 1, got {self.sat_factor}, "
                             f"{self.lat_factor}, {self.sat_repeats}")

    @property
    def warm_pool(self) -> int:
        return max(max(self.sweep), self.latency_deltas)

    def workload(self, *, rate: float, popularity: str, num_deltas: int, seed: int, vocab: int, latency: bool,
                 max_requests: int | None = None) -> WorkloadConfig:
        return WorkloadConfig(
            rate=rate, duration_s=self.lat_duration_s if latency else self.sat_duration_s,
            max_requests=max_requests or (self.lat_max_requests if latency else self.sat_max_requests),
            popularity=popularity, num_deltas=num_deltas, cold_fraction=self.cold_fraction if latency else 0.0,
            prompt_len=self.prompt_len, output_len=self.output_len, vocab_size=vocab, seed=self.seed + seed)


QUICK = BenchSettings()
FULL = BenchSettings(sweep=(1, 2, 4, 8, 16, 32, 64), sat_duration_s=30.0, sat_max_requests=400, sat_repeats=3,
                     lat_duration_s=40.0, lat_max_requests=600, prompt_len=LengthDist(128, 0.8, 8, 1024),
                     output_len=LengthDist(64, 0.6, 4, 256), hard_timeout_s=600.0,
                     server={"grace_seconds": 10.0})


# ---- gRPC setup ---------------------------------------------------------------------------------
async def create_tenants(address: str, admin_key: str, names: list[str]) -> list[str]:
    async with AsyncClient(address, admin_key, timeout=CALL_TIMEOUT_S) as c:
        return [(await c.create_tenant(n, quotas=GENEROUS_QUOTAS))[1] for n in names]


async def upload(address: str, keys: list[str], refs: list[DeltaRef], payloads: dict) -> dict:
    """Upload ``refs`` (payloads[name] = Payload) with bounded concurrency, one upload per tenant at a time (the
    server refuses a tenant's third concurrent upload: ``max_uploads_per_tenant`` defaults to 2, and uploads of
    different sizes finishing out of order put three of one tenant in flight); returns sizes and time."""
    sem = asyncio.Semaphore(UPLOAD_CONCURRENCY)
    per_tenant = {t: asyncio.Semaphore(1) for t in {r.tenant for r in refs}}
    t0 = time.perf_counter()
    async with AsyncClient(address, timeout=CALL_TIMEOUT_S) as c:
        async def one(ref: DeltaRef):
            async with per_tenant[ref.tenant], sem:
                p = payloads[ref.name]
                v = await c.with_key(keys[ref.tenant]).upload(ref.name, p.data, description=p.recipe,
                                                   labels={"recipe": p.recipe, "source": p.source_format})
                return len(p.data), v.size_bytes
        sizes = await asyncio.gather(*(one(r) for r in refs))
    return {"deltas": len(refs), "payload_bytes": sum(x[0] for x in sizes), "stored_bytes": sum(x[1] for x in sizes),
            "seconds": time.perf_counter() - t0}


# ---- phase sequences ----------------------------------------------------------------------------
def saturation(run: PhaseRunner, s: BenchSettings, warm: list[DeltaRef], vocab: int) -> dict:
    """Calibrate, then B D(n1)..D(nk) B D(n1)..D(nk) B ...; returns per-n ratio points and the rows."""
    burst = s.workload(rate=1000.0, popularity="none", num_deltas=0, seed=2, vocab=vocab, latency=False)
    calib = run.run("calibrate_base", "calibrate", make_plan(burst, warm, base_tenants=s.tenants))
    if not (calib["req_per_s"] > 0):
        raise RuntimeError(f"calibration served no request: {calib['by_status']}")
    rate = s.sat_factor * calib["req_per_s"]
    print(f"base capacity ~{calib['req_per_s']:.2f} req/s: saturation arrivals at {rate:.2f} req/s", flush=True)
    plans = {n: make_plan(s.workload(rate=rate, popularity="uniform", num_deltas=n, seed=3, vocab=vocab,
                                     latency=False), warm) for n in s.sweep}
    base_plan = as_base(plans[s.sweep[0]])  # same arrivals and lengths, no delta
    salts = itertools.count(1)  # every phase its own prompt tokens: none reuses another's KV (fresh_prompts)

    def phase(name: str, plan: list, **meta) -> dict:
        return run.run(name, "throughput", fresh_prompts(plan, next(salts), vocab), rate=rate, **meta)

    bases = [phase("sat_base_0", base_plan, num_deltas=0, rep=0)]
    rows: dict[int, list[dict]] = {n: [] for n in s.sweep}
    for rep in range(s.sat_repeats):
        for n in s.sweep:
            rows[n].append(phase(f"sat_deltas_{n}_{rep}", plans[n], num_deltas=n, rep=rep))
        bases.append(phase(f"sat_base_{rep + 1}", base_plan, num_deltas=0, rep=rep + 1))
    points = {}
    for n in s.sweep:
        ratios, cpu = [], []
        for rep, row in enumerate(rows[n]):
            bracket = bases[rep:rep + 2]
            ratios.append(row["tok_per_s"] / statistics.mean(b["tok_per_s"] for b in bracket))
            cpu.append(row["tok_per_cpu_s"] / statistics.mean(b["tok_per_cpu_s"] for b in bracket))
        points[n] = run.add({"phase": f"ratio_deltas_{n}", "group": "ratio", "num_deltas": n,
                             "throughput_ratio_vs_base": statistics.median(ratios), "ratios": ratios,
                             "cpu_ratio_vs_base": statistics.median(cpu), "cpu_ratios": cpu,
                             "tok_per_s": statistics.median(r["tok_per_s"] for r in rows[n]),
                             "req_per_s": statistics.median(r["req_per_s"] for r in rows[n])})
        print(f"ratio vs base, {n:3d} deltas: {points[n]['throughput_ratio_vs_base']:.3f} wall clock "
              f"({', '.join(f'{x:.3f}' for x in ratios)}), {points[n]['cpu_ratio_vs_base']:.3f} per server "
              f"CPU-second", flush=True)
    return {"points": points, "bases": bases}


def latency(run: PhaseRunner, s: BenchSettings, rate: float, warm: list[DeltaRef], cold: dict, factory,
            payloads: dict, address: str, keys: list[str], vocab: int) -> dict:
    """Base alone, then each popularity with its cold deltas uploaded just before its phase."""
    print(f"latency phases at {rate:.2f} req/s", flush=True)
    cfg = s.workload(rate=rate, popularity="uniform", num_deltas=s.latency_deltas, seed=4, vocab=vocab, latency=True)
    run.run("lat_base", "latency", as_base(make_plan(cfg, warm, cold["uniform"])), num_deltas=0, rate=rate)
    rows = {}
    for j, pop in enumerate(POPULARITIES):
        plan = make_plan(replace(cfg, popularity=pop, seed=cfg.seed + 1 + j), warm, cold[pop])
        used = [ref for ref in cold[pop] if any(p.cold and p.delta == ref.name for p in plan)]
        payloads.update({ref.name: factory.build(ref.kind, seed=2000 + 100 * j + k) for k, ref in enumerate(used)})
        up = asyncio.run(upload(address, keys, used, payloads))
        rows[pop] = run.run(f"lat_{pop}_{s.latency_deltas}", "latency", plan, num_deltas=s.latency_deltas, rate=rate,
                            popularity=pop, cold_uploaded=up["deltas"], cold_upload_s=up["seconds"])
    return rows


def headline(run: PhaseRunner, s: BenchSettings, sat: dict, lat: dict) -> dict:
    top = max(s.sweep)
    point, bases = sat["points"][top], [b["tok_per_s"] for b in sat["bases"]]
    ok = [r for pop in POPULARITIES for r in run.records[f"lat_{pop}_{s.latency_deltas}"] if r.status == "OK"]
    cold = [r.ttft for r in ok if r.cold and r.ttft is not None]
    warm = [r.ttft for r in ok if not r.cold and r.ttft is not None]
    cold_vs_warm = percentile(cold, 99) / percentile(warm, 99) if cold and warm else math.nan
    codes = Counter()
    for r in run.rows:
        codes.update({k: v for k, v in r.get("by_status", {}).items() if k != "OK"})
    uni = lat["uniform"]
    ratio = point["throughput_ratio_vs_base"]
    return dict(
        throughput_ratio_vs_base=ratio, cpu_ratio_vs_base=point["cpu_ratio_vs_base"], num_deltas=top,
        tok_s=point["tok_per_s"], req_s=point["req_per_s"], base_tok_s=statistics.median(bases),
        base_spread=(max(bases) - min(bases)) / statistics.median(bases),
        ttft_p50_ms=uni["ttft_p50_ms"], ttft_p99_ms=uni["ttft_p99_ms"], tpot_p50_ms=uni["tpot_p50_ms"],
        tpot_p99_ms=uni["tpot_p99_ms"], ttft_p99_cold_vs_warm=cold_vs_warm, cold_requests=len(cold),
        target_throughput="met" if ratio >= 0.80 else "missed",
        target_cold_ttft="met" if cold_vs_warm <= 2.0 else "missed",
        metrics_check=("skipped" if not run.metrics_url else "pass" if not run.check_failures
                       else "fail:" + ",".join(run.check_failures)),
        errors=sum(codes.values()), error_codes=",".join(f"{k}:{v}" for k, v in sorted(codes.items())) or "-")


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU run of under three minutes with the demo model")
    p.add_argument("--server", help="HOST:PORT of a running server (default: start one here)")
    p.add_argument("--api-key", help="admin API key of --server")
    p.add_argument("--metrics-url", help="Prometheus URL of --server, for the cross-check (skipped without it)")
    p.add_argument("--model", help="HF model folder the server serves (default: a random Llama of --shape)")
    p.add_argument("--shape", choices=("cpu", "demo", "gpu"), default="demo",
                   help="random Llama built under the data dir: demo (hidden 256, the built-in demo model), "
                        "cpu (hidden 1024, DESIGN's CPU benchmark shape), gpu (hidden 4096)")
    p.add_argument("--layers", type=int, help="decoder layers of the --shape model (default 4)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="server dtype")
    p.add_argument("--sweep", help="comma-separated distinct-delta counts for the saturation phases")
    p.add_argument("--sat-duration", type=float, help="seconds of arrivals per saturation phase")
    p.add_argument("--lat-duration", type=float, help="seconds of arrivals per latency phase")
    p.add_argument("--requests", type=int, help="most requests per saturation and latency phase (a GPU needs more)")
    p.add_argument("--out-dir", help="results folder (default benchmarks/results, or BENCH_RESULTS_DIR)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true", help="print every metrics cross-check")
    p.add_argument("--py-spy", metavar="FILE", help="record the server process with py-spy (collapsed stacks, "
                   "every thread) into FILE and print where its CPU samples went (benchmarks/load/profile.py)")
    args = p.parse_args(argv)
    if args.py_spy and args.server:
        p.error("--py-spy records the server this benchmark starts; not with --server")
    if args.py_spy and shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                     os.environ.get("PATH", "")])) is None:
        p.error("--py-spy needs the py-spy executable (pip install py-spy; it is in the dev extras)")
    if args.server and not args.api_key:
        p.error("--server needs --api-key (an admin key: the benchmark creates its own tenants)")
    try:
        s = replace(QUICK if args.quick else FULL)
        if args.sweep:
            sweep = tuple(int(x) for x in args.sweep.split(","))
            s = replace(s, sweep=sweep, latency_deltas=min(s.latency_deltas, max(sweep)))
        s = replace(s, sat_duration_s=args.sat_duration or s.sat_duration_s,
                    lat_duration_s=args.lat_duration or s.lat_duration_s,
                    sat_max_requests=args.requests or s.sat_max_requests,
                    lat_max_requests=args.requests or s.lat_max_requests)
    except ValueError as exc:
        p.error(str(exc))
    if args.dtype:
        s.server = {**s.server, "dtype": args.dtype}
    return args, s


def start_py_spy(pid: int, out: str) -> subprocess.Popen:
    """py-spy sampling ``pid`` at 40 Hz without pausing it (``--nonblocking``: the pauses would be counted as
    serving time), one stack per thread, collapsed-stack text into ``out``; it stops when the process exits."""
    exe = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.Popen([exe, "record", "-p", str(pid), "-r", "40", "--nonblocking", "--threads", "-f", "raw",
                             "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def model_dir(args, data_dir: Path) -> Path:
    if args.model:
        return Path(args.model)
    # the demo builder with a wider shape: same byte-level tokenizer (vocab 259), random weights, fixed seed
    return build_model(data_dir, args.shape, args.layers)


def main(argv=None) -> int:
    args, s = parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as tmp:
        data_dir = Path(tmp)
        mdir = model_dir(args, data_dir)
        server = spy = None
        if args.server:
            address, admin_key, metrics_url = args.server, args.api_key, args.metrics_url or ""
        else:
            custom = args.model or args.shape != "demo" or args.layers
            server = ServerProcess(data_dir, s.server, model=str(mdir) if custom else None).launch()
        try:
            from load.payloads import DeltaFactory, recipe_mix

            t0 = time.perf_counter()
            factory = DeltaFactory(mdir)  # runs while the server loads the same model
            vocab = factory.spec.vocab_size
            tag = f"r{int(time.time()) % 100000}"  # fresh tenant names, also on a long-lived --server
            warm = [DeltaRef(i % s.tenants, f"w{i:03d}-{r}", r) for i, r in enumerate(recipe_mix(s.warm_pool))]
            # cold deltas: a pool of names per popularity; only those a plan uses are built and uploaded
            cold = {pop: [DeltaRef(i % s.tenants, f"c{j}{i:03d}-{r}", r)
                          for i, r in enumerate(recipe_mix(s.lat_max_requests, offset=3 * j + 1))]
                    for j, pop in enumerate(POPULARITIES)}
            payloads = {ref.name: factory.build(ref.kind, seed=1000 + k) for k, ref in enumerate(warm)}
            build_s = time.perf_counter() - t0
            if server is not None:
                server.wait_ready()
                address, admin_key, metrics_url = server.address, server.admin_key, server.metrics_url
                if args.py_spy:
                    spy = start_py_spy(server.pid, args.py_spy)
            label = f"{'quick' if args.quick else 'full'}-{'model' if args.model else args.shape}"
            settings = {**asdict(s), "quick": args.quick, "label": label,
                        "model": args.model or f"random llama, shape {args.shape}, layers {args.layers or 4}",
                        "target": "external" if args.server else "subprocess", "vocab": vocab,
                        "kernels": os.environ.get("DELTASERVE_KERNELS")
                        or ("cpu" if server is not None and not cuda_present() else "auto")}
            results = Results(__file__, settings, out_dir=args.out_dir)
            keys = asyncio.run(create_tenants(address, admin_key, [f"load-{tag}-t{i}" for i in range(s.tenants)]))
            up = asyncio.run(upload(address, keys, warm, payloads))
            startup = server.startup_s if server else 0.0
            print(f"setup: server start {startup:.1f} s, built {len(payloads)} deltas in {build_s:.1f} s, uploaded "
                  f"{up['deltas']} ({up['stored_bytes'] / 1e6:.1f} MB stored) in {up['seconds']:.1f} s", flush=True)
            with LoadDriver() as driver:
                run = PhaseRunner(results, address=address, metrics_url=metrics_url, keys=keys, driver=driver,
                                  hard_timeout_s=s.hard_timeout_s, server_pid=server.pid if server else None,
                                  verbose=args.verbose)
                run.add({"phase": "setup", "group": "setup", "server_startup_s": startup, "build_s": build_s,
                         "upload": up, "recipes": {r.name: r.kind for r in warm}})
                # warm-up: every warm delta once (host tier, device memory, code paths)
                wplan = make_plan(s.workload(rate=50.0, popularity="uniform", num_deltas=s.warm_pool, seed=1,
                                             vocab=vocab, latency=False, max_requests=s.warm_pool), warm)
                for req, ref in zip(wplan, warm):
                    req.delta, req.tenant, req.kind, req.max_new_tokens = ref.name, ref.tenant, ref.kind, 4
                run.run("warmup", "warmup", wplan)
                sat = saturation(run, s, warm, vocab)
                rate = s.lat_factor * sat["points"][max(s.sweep)]["req_per_s"]
                lat = latency(run, s, rate, warm, cold, factory, payloads, address, keys, vocab)
            summary = headline(run, s, sat, lat)
            summary["wall_s"] = time.perf_counter() - t_start
            run.add({"phase": "summary", "group": "summary", **summary})
            if not args.no_plots:
                import plot

                for path in plot.plot_run(results.path, results.run_id, out_dir=results.path.parent):
                    print(f"plot: {path}", flush=True)
        finally:
            if server is not None and server.stop() != 0:
                print(f"server exited with status {server.exit_code}; log tail:\n{server.log_tail()}", file=sys.stderr)
            if spy is not None:
                spy.wait(timeout=60)  # py-spy writes its file once the process it records has exited
                from load.profile import read, report

                with open(args.py_spy) as f:
                    print(f"py-spy profile of the server ({args.py_spy}):\n{report(read(f))}", flush=True)
    results.summary(**summary)
    return 0 if summary["errors"] == 0 and summary["metrics_check"] in ("pass", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
