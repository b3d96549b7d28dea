"""Soak test: a bounded mixed load on a loopback server, then checks that nothing was lost or leaked.

    python benchmarks/soak.py --duration 60            # exit 0 = pass; 1 = a violation (one line says which)

The load, for ``--duration`` seconds (and at most ``--max-requests`` Generate calls), all at once:
  * open-loop Poisson Generate calls from several tenants: plain ones on live deltas and on the base
    model; ones the client cancels mid-stream; ones with a deadline too short to finish; ones naming a
    delta deleted earlier;
  * churn: a new delta uploaded every ``--upload-every`` seconds (PEFT LoRA / (IA)3 archives and native
    bottleneck / BitFit files, identical payloads under several names, so blobs are shared), and the
    oldest deleted once a tenant holds more than ``--max-live`` (often while requests still use it);
  * more live deltas than device slots, so slots are evicted and reloaded all along.

Then it asserts, and exits non-zero with ``soak: FAIL <reason>`` on the first violation:
  1. every request ended, within a bound, with a status its behaviour allows (no UNKNOWN, INTERNAL,
     UNAVAILABLE, no hang; a plain request that finished produced all its tokens);
  2. the server settled: no request in flight, none running or waiting, no slot pinned, KV blocks in
     use back to the baseline, device slots in use no more than the deltas still listed;
  3. resident memory (psutil on the server pid) returned within a tolerance of the baseline taken after
     a warm-up of the same load;
  4. the deltas listed are exactly those uploaded and not deleted, and each one answers GetDelta,
     PreloadDelta (to a device slot) and a short Generate;
  5. the server counted no INTERNAL/UNKNOWN RPC, logged no traceback, and drained on SIGTERM with status 0.
One JSON line per RSS sample and one for the verdict go to ``benchmarks/results/soak-<date>.jsonl``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from load.server_proc import ServerProcess, cuda_present  # noqa: E402  (stdlib only: imports no triton)

if not cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)

import psutil  # noqa: E402

from common import Results  # noqa: E402
from load.client import Client, Record  # noqa: E402
from load.prom import Scrape, scrape  # noqa: E402
from load.workload import LengthDist, PlannedRequest  # noqa: E402

BEHAVIOURS = ("plain", "base", "cancel", "deadline", "deleted")
# Statuses each behaviour may end with. NOT_FOUND is also allowed for a delta deleted before the
# request ended (a delete may land between the client's choice and the server's lookup).
ALLOWED = {"plain": {"OK"}, "base": {"OK"}, "cancel": {"OK", "CANCELLED"},
           "deadline": {"OK", "DEADLINE_EXCEEDED"}, "deleted": {"NOT_FOUND"}}
RECIPES = ("lora_r4_qv", "ia3", "bottleneck_w32", "bitfit", "lora_r16_all", "beft")


class Violation(Exception):
    """One broken invariant; its message is the one-line reason printed on failure."""


@dataclass(slots=True)
class SoakSettings:
    duration_s: float = 60.0
    max_requests: int = 5000
    rate: float = 4.0  # Generate arrivals per second
    mix: dict = field(default_factory=lambda: {"plain": 0.55, "base": 0.1, "cancel": 0.13, "deadline": 0.13,
                                               "deleted": 0.09})
    tenants: int = 2
    upload_every_s: float = 1.5
    max_live: int = 5  # per tenant; with 2 tenants, 10 live deltas for 4 device slots
    warmup_s: float = 0.0  # 0 -> a quarter of the duration, within [4, 15] s
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist(32, 0.6, 4, 128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist(12, 0.5, 2, 32))
    hard_timeout_s: float = 60.0  # a request without its own deadline that runs longer is a hang
    settle_timeout_s: float = 30.0
    rss_tolerance_frac: float = 0.10
    rss_tolerance_mb: float = 64.0
    seed: int = 0
    server: dict = field(default_factory=lambda: {"max_slots": 4, "max_bottleneck": 64, "kv_blocks": 512,
                                                  "grace_seconds": 5.0})

    def __post_init__(self) -> None:
        if not (0 < self.duration_s <= 24 * 3600):
            raise ValueError(f"--duration must be in (0, 86400] seconds, got {self.duration_s}")
        if self.max_requests < 1 or not (self.rate > 0):
            raise ValueError(f"--max-requests must be >= 1 and --rate > 0, got {self.max_requests}, {self.rate}")
        if set(self.mix) - set(BEHAVIOURS) or abs(sum(self.mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"mix must give fractions of {BEHAVIOURS} summing to 1, got {self.mix}")
        if self.max_live < 1 or self.tenants < 1:
            raise ValueError(f"--max-live and tenants must be >= 1, got {self.max_live}, {self.tenants}")
        if not self.warmup_s:
            self.warmup_s = min(15.0, max(4.0, self.duration_s / 4))


@dataclass(slots=True)
class LiveDelta:
    tenant: int
    name: str
    recipe: str
    deleted_at: float | None = None  # perf_counter time of the DeleteDelta call's start


class Soak:
    def __init__(self, s: SoakSettings, server: ServerProcess, keys: list[str], payloads: dict, results: Results):
        self.s, self.server, self.keys, self.payloads, self.results = s, server, keys, payloads, results
        self.rng = random.Random(s.seed)
        self.deltas: list[LiveDelta] = []
        self.records: list[tuple[str, Record, LiveDelta | None]] = []
        self.uploads = self.deletes = 0
        self.counter = 0
        self.t0 = 0.0  # perf_counter at the start of the current load; record times are relative to it
        self.proc = psutil.Process(server.pid)

    # ---- load ---------------------------------------------------------------------------------
    def live(self, tenant: int | None = None) -> list[LiveDelta]:
        return [d for d in self.deltas if d.deleted_at is None and (tenant is None or d.tenant == tenant)]

    async def upload_one(self, c: Client, tenant: int) -> LiveDelta:
        recipe = self.rng.choice(list(self.payloads))
        self.counter += 1
        d = LiveDelta(tenant, f"soak{self.counter:05d}-{recipe}", recipe)
        await c.upload(self.keys[tenant], d.name, self.payloads[recipe], description=recipe)
        self.deltas.append(d)
        self.uploads += 1
        return d

    async def churn(self, c: Client, until: float) -> None:
        while time.perf_counter() < until:
            tenant = self.rng.randrange(self.s.tenants)
            await self.upload_one(c, tenant)
            live = self.live(tenant)
            if len(live) > self.s.max_live:
                victim = live[0]
                victim.deleted_at = time.perf_counter()
                n = await c.delete(self.keys[tenant], victim.name)
                if n < 1:
                    raise Violation(f"DeleteDelta {victim.name}: deleted {n} versions of a delta just listed live")
                self.deletes += 1
            await asyncio.sleep(min(self.s.upload_every_s, max(0.0, until - time.perf_counter())))

    def _request(self, behaviour: str, t0: float) -> tuple[PlannedRequest, LiveDelta | None]:
        rng, s = self.rng, self.s
        target: LiveDelta | None = None
        tenant = rng.randrange(s.tenants)
        if behaviour == "deleted":
            gone = [d for d in self.deltas if d.deleted_at is not None]
            if not gone:
                behaviour = "plain"
            else:
                target = rng.choice(gone)
        if behaviour in ("plain", "cancel", "deadline"):
            live = self.live()
            target = rng.choice(live) if live else None
        if target is not None:
            tenant = target.tenant
        n_out = s.output_len.sample(rng)
        req = PlannedRequest(index=self.counter, at=time.perf_counter() - t0, tenant=tenant,
                             delta=target.name if target is not None else "", kind=behaviour, cold=False,
                             prompt=[rng.randrange(3, 259) for _ in range(s.prompt_len.sample(rng))],
                             max_new_tokens=n_out, seed=rng.randrange(1 << 31))
        if behaviour == "cancel":
            req.cancel_after_s = rng.uniform(0.02, 1.0)
        elif behaviour == "deadline":
            req.max_new_tokens = s.output_len.hi  # long enough that most deadlines expire mid-stream
            req.timeout_s = rng.uniform(0.05, 0.6)
        self.counter += 1
        return req, target

    async def load(self, c: Client, duration_s: float, max_requests: int) -> int:
        """Poisson arrivals for ``duration_s`` (at most ``max_requests``), churn alongside; waits for all."""
        t0 = self.t0 = time.perf_counter()
        until = t0 + duration_s
        churn = asyncio.create_task(self.churn(c, until))
        tasks, sent = [], 0
        behaviours, weights = zip(*self.s.mix.items())
        next_at = t0
        while sent < max_requests:
            next_at += self.rng.expovariate(self.s.rate)
            if next_at >= until:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            behaviour = self.rng.choices(behaviours, weights)[0]
            req, target = self._request(behaviour, t0)
            tasks.append((req.kind, target, asyncio.create_task(
                c.generate(self.keys[req.tenant], req, t0, hard_timeout_s=self.s.hard_timeout_s))))
            sent += 1
        await churn
        for behaviour, target, task in tasks:
            self.records.append((behaviour, await task, target))
        return sent

    # ---- checks -------------------------------------------------------------------------------
    def check_records(self) -> Counter:
        t0 = self.t0
        outcomes: Counter = Counter()
        for behaviour, rec, target in self.records:
            outcomes[f"{behaviour}:{rec.status}"] += 1
            allowed = set(ALLOWED[behaviour])
            if target is not None and target.deleted_at is not None and target.deleted_at - t0 <= rec.end:
                allowed.add("NOT_FOUND")
            if rec.status not in allowed:
                raise Violation(f"request {rec.index} ({behaviour}, delta {rec.delta or '-'}) ended {rec.status}"
                                f" ({rec.detail or 'no details'}); allowed: {sorted(allowed)}")
            if rec.status == "OK" and not rec.cancelled_by_client and (rec.tokens != rec.max_new_tokens
                                                                        or rec.finish != "length"):
                raise Violation(f"request {rec.index} ({behaviour}) ended OK with {rec.tokens}/{rec.max_new_tokens} "
                                f"tokens, finish {rec.finish!r} (ignore_eos: expected all, 'length')")
        return outcomes

    def gauges(self, m: Scrape) -> dict:
        return {"in_flight": m.value("deltaserve_requests_in_flight"), "running": m.value("deltaserve_scheduler_running"),
                "waiting": m.value("deltaserve_scheduler_waiting"), "kv_used": m.value("deltaserve_kv_blocks_in_use"),
                "slots_pinned": m.value("deltaserve_delta_slots_pinned"),
                "slots_used": m.value("deltaserve_delta_slots_in_use"),
                "slots_total": m.value("deltaserve_delta_slots_total"), "rss_mb": self.rss_mb()}

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    async def settle(self) -> dict:
        """Wait (bounded) until nothing is in flight, running or waiting; return the gauges."""
        deadline = time.monotonic() + self.s.settle_timeout_s
        while True:
            g = self.gauges(await asyncio.to_thread(scrape, self.server.metrics_url))
            if g["in_flight"] == 0 and g["running"] == 0 and g["waiting"] == 0 and g["slots_pinned"] == 0:
                return g
            if time.monotonic() > deadline:
                raise Violation(f"server did not settle within {self.s.settle_timeout_s:.0f} s after the load: {g}")
            await asyncio.sleep(0.25)

    async def verify_deltas(self, c: Client) -> int:
        checked = 0
        for tenant in range(self.s.tenants):
            key = self.keys[tenant]
            listed = {d.name: d for d in await c.list_all(key, page_size=3)}  # small pages exercise paging
            expected = {d.name for d in self.live(tenant)}
            if set(listed) != expected:
                raise Violation(f"tenant {tenant}: ListDeltas gave {sorted(set(listed) - expected)} not expected and "
                                f"missed {sorted(expected - set(listed))}")
            for name in sorted(listed):
                info = await c.get(key, name)
                if info.name != name or not info.versions or not info.versions[-1].digest:
                    raise Violation(f"GetDelta {name}: bad reply (name {info.name!r}, {len(info.versions)} versions)")
                await c.preload(key, name, device=True)
                req = PlannedRequest(index=-1, at=0.0, tenant=tenant, delta=name, kind="verify", cold=False,
                                     prompt=[5, 6, 7, 8], max_new_tokens=4, seed=1)
                rec = await c.generate(key, req, time.perf_counter(), hard_timeout_s=self.s.hard_timeout_s)
                if rec.status != "OK" or rec.tokens != 4:
                    raise Violation(f"Generate on listed delta {name}: {rec.status} with {rec.tokens}/4 tokens "
                                    f"({rec.detail})")
                checked += 1
        return checked

    async def sample_rss(self, until: float, label: str) -> None:
        while time.perf_counter() < until:
            self.results.write({"phase": label, "t": time.time(), "rss_mb": self.rss_mb()})
            await asyncio.sleep(2.0)


async def run_soak(s: SoakSettings, server: ServerProcess, payloads: dict, results: Results) -> dict:
    async with Client(server.address) as c:
        keys = [await c.create_tenant(server.admin_key, f"soak-t{i}") for i in range(s.tenants)]
        soak = Soak(s, server, keys, payloads, results)
        for i in range(s.tenants * ((s.max_live + 1) // 2)):
            await soak.upload_one(c, i % s.tenants)
        # warm-up with the same load, so the baseline holds what a steady server holds (allocator pools,
        # touched KV pages, the host tier at its working-set size)
        await soak.load(c, s.warmup_s, s.max_requests)
        soak.check_records()
        base = await soak.settle()
        soak.records.clear()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(soak.sample_rss(t0 + s.duration_s, "rss"))
        sent = await soak.load(c, s.duration_s, s.max_requests)
        sampler.cancel()
        outcomes = soak.check_records()
        await soak.settle()
        verified = await soak.verify_deltas(c)
        end = await soak.settle()
        m = await asyncio.to_thread(scrape, server.metrics_url)
        bad = {k: v for k, v in m.by_label("deltaserve_rpcs_total", "code").items() if k in ("INTERNAL", "UNKNOWN") and v}
        if bad:
            raise Violation(f"server counted RPCs ending {bad} (by method: "
                            f"{ {lab.get('method'): v for lab, v in m.samples.get('deltaserve_rpcs_total', []) if lab.get('code') in bad} })")
        if end["kv_used"] > base["kv_used"]:
            raise Violation(f"KV blocks in use {end['kv_used']:.0f} after the soak, {base['kv_used']:.0f} at the baseline")
        live = len(soak.live())
        if end["slots_used"] > min(end["slots_total"], live):
            raise Violation(f"{end['slots_used']:.0f} device slots in use for {live} live deltas "
                            f"({end['slots_total']:.0f} slots): deleted deltas kept their slots")
        limit = base["rss_mb"] * (1 + s.rss_tolerance_frac) + s.rss_tolerance_mb
        if end["rss_mb"] > limit:
            raise Violation(f"server RSS {end['rss_mb']:.0f} MB after the soak, baseline {base['rss_mb']:.0f} MB "
                            f"(limit {limit:.0f} MB)")
        return {"requests": sent, "outcomes": dict(sorted(outcomes.items())), "uploads": soak.uploads,
                "deletes": soak.deletes, "live_deltas": live, "verified_deltas": verified, "baseline": base, "end": end,
                "rss_growth_mb": end["rss_mb"] - base["rss_mb"], "rss_limit_mb": limit}


def parse_args(argv=None) -> tuple[SoakSettings, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of mixed load after the warm-up")
    p.add_argument("--max-requests", type=int, default=5000, help="bound on Generate calls in the soak phase")
    p.add_argument("--rate", type=float, default=4.0, help="Generate arrivals per second")
    p.add_argument("--upload-every", type=float, default=1.5, help="seconds between uploads")
    p.add_argument("--max-live", type=int, default=5, help="live deltas per tenant before the oldest is deleted")
    p.add_argument("--warmup", type=float, default=0.0, help="warm-up seconds (0: a quarter of --duration, 4-15 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", help="results folder (default benchmarks/results, or BENCH_RESULTS_DIR)")
    a = p.parse_args(argv)
    try:
        return SoakSettings(duration_s=a.duration, max_requests=a.max_requests, rate=a.rate,
                            upload_every_s=a.upload_every, max_live=a.max_live, warmup_s=a.warmup,
                            seed=a.seed), a.out_dir
    except ValueError as exc:
        p.error(str(exc))


def main(argv=None) -> int:
    s, out_dir = parse_args(argv)
    t_start = time.perf_counter()
    results = Results(__file__, asdict(s), out_dir=out_dir)
    verdict, report = "pass", {}
    with tempfile.TemporaryDirectory(prefix="deltaserve-soak-") as tmp:
        from server.demo import ensure_demo_model

        model_dir = ensure_demo_model(tmp)[0]
        server = ServerProcess(tmp, s.server).launch()
        try:
            from load.payloads import DeltaFactory

            factory = DeltaFactory(model_dir)  # while the server loads
            payloads = {r: factory.build(r, seed=k).data for k, r in enumerate(RECIPES)}
            server.wait_ready()
            report = asyncio.run(run_soak(s, server, payloads, results))
        except Violation as exc:
            verdict = f"FAIL {exc}"
        except Exception as exc:  # noqa: BLE001 - a failed upload, delete or scrape is a failed soak too
            first = (str(exc).strip().splitlines() or [""])[0]
            verdict = f"FAIL {type(exc).__name__}: {first}"
        finally:
            code = server.stop()
        if verdict == "pass" and code != 0:
            verdict = f"FAIL server exited with status {code} on SIGTERM (expected a clean drain, 0)"
        if verdict == "pass" and server.tracebacks:
            verdict = f"FAIL server logged {server.tracebacks} traceback(s); last lines: {server.log_tail(3)!r}"
    results.write({"phase": "verdict", "verdict": verdict, "wall_s": time.perf_counter() - t_start, **report})
    if verdict != "pass":
        print(f"soak: {verdict}", flush=True)
    o = report.get("outcomes", {})
    count = (lambda status: sum(v for k, v in o.items() if k.endswith(":" + status)))
    results.summary(result="pass" if verdict == "pass" else "fail", duration_s=s.duration_s,
                    requests=report.get("requests", 0), ok=count("OK"), cancelled=count("CANCELLED"),
                    deadline_exceeded=count("DEADLINE_EXCEEDED"), not_found=count("NOT_FOUND"),
                    uploads=report.get("uploads", 0), deletes=report.get("deletes", 0),
                    verified_deltas=report.get("verified_deltas", 0),
                    rss_growth_mb=round(report.get("rss_growth_mb", float("nan")), 1),
                    kv_blocks_end=report.get("end", {}).get("kv_used", "nan"),
                    wall_s=round(time.perf_counter() - t_start, 1))
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
