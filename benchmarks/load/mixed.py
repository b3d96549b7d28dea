"""The soak's mixed load and its invariants: Poisson Generate calls of five behaviours (plain, base,
client-cancelled, deadline too short, deleted delta) beside a churn of uploads and deletes and the abusive
attempts of ``abuse.py`` (maximal prompts, zip bombs, garbage, cancelled and over-quota uploads, upload
bursts), and the checks run afterwards (allowed statuses, server settled, deltas listed and served,
memory, disk: no scratch file, no orphan or missing blob, the data dir grown only by the live blobs).

``benchmarks/soak.py`` drives it; the settings dataclass is the one place its defaults live.
"""
from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from server.client import AsyncClient

from .abuse import Abuser
from .prom import Scrape, scrape
from .record import Record, timed_generate
from .server_proc import ServerProcess
from .workload import LengthDist, PlannedRequest

if TYPE_CHECKING:  # benchmarks/common.py, imported by the script that runs the soak
    from common import Results

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
    max_live: int = 5  # per tenant; with 2 tenants, 10 live deltas for a device budget holding about 4
    warmup_s: float = 0.0  # 0 -> a quarter of the duration, within [4, 15] s
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist(32, 0.6, 4, 128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist(12, 0.5, 2, 32))
    hard_timeout_s: float = 60.0  # a request without its own deadline that runs longer is a hang
    settle_timeout_s: float = 30.0
    rss_tolerance_frac: float = 0.10
    rss_tolerance_mb: float = 64.0
    abuse_every_s: float = 2.0  # seconds between abusive attempts (0: none)
    disk_slack_mb: float = 16.0  # data-dir growth allowed beyond the live blobs' (catalogue rows, WAL)
    seed: int = 0
    # 8 MiB of delta memory: the largest recipe (rank-64 LoRA on every projection of the demo model, 4.7 MB) fits,
    # about four average deltas do, so deltas are evicted and reloaded all along
    server: dict = field(default_factory=lambda: {"delta_memory_bytes": 8 << 20, "max_bottleneck": 64,
                                                  "kv_blocks": 512, "grace_seconds": 5.0,
                                                  "health_grace_seconds": 1.0, "max_uploads": 8,
                                                  "max_uploads_per_tenant": 2})

    def __post_init__(self) -> None:
        if not (0 < self.duration_s <= 24 * 3600):
            raise ValueError(f"--duration must be in (0, 86400] seconds, got {self.duration_s}")
        if self.max_requests < 1 or not (self.rate > 0):
            raise ValueError(f"--max-requests must be >= 1 and --rate > 0, got {self.max_requests}, {self.rate}")
        if set(self.mix) - set(BEHAVIOURS) or abs(sum(self.mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"mix must give fractions of {BEHAVIOURS} summing to 1, got {self.mix}")
        if self.rss_tolerance_frac < 0 or self.rss_tolerance_mb < 0:
            raise ValueError(f"RSS tolerances must be >= 0, got {self.rss_tolerance_frac}, {self.rss_tolerance_mb} MB")
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
    def __init__(self, s: SoakSettings, server: ServerProcess, keys: list[str], payloads: dict, results: Results,
                 abuser: Abuser | None = None):
        self.s, self.server, self.keys, self.payloads, self.results = s, server, keys, payloads, results
        self.abuser = abuser
        self.rng = random.Random(s.seed)
        self.deltas: list[LiveDelta] = []
        self.records: list[tuple[str, Record, LiveDelta | None]] = []
        self.uploads = self.deletes = 0
        self.counter = 0
        self.cancels = 0  # cancel-behaviour requests planned (they alternate clock and mid-stream cancels)
        self.t0 = 0.0  # perf_counter at the start of the current load; record times are relative to it
        self.proc = psutil.Process(server.pid)

    # ---- load ---------------------------------------------------------------------------------
    def live(self, tenant: int | None = None) -> list[LiveDelta]:
        return [d for d in self.deltas if d.deleted_at is None and (tenant is None or d.tenant == tenant)]

    async def upload_one(self, c: AsyncClient, tenant: int) -> LiveDelta:
        recipe = self.rng.choice(list(self.payloads))
        self.counter += 1
        d = LiveDelta(tenant, f"soak{self.counter:05d}-{recipe}", recipe)
        await c.with_key(self.keys[tenant]).upload(d.name, self.payloads[recipe], description=recipe)
        self.deltas.append(d)
        self.uploads += 1
        return d

    async def churn(self, c: AsyncClient, until: float) -> None:
        while time.perf_counter() < until:
            tenant = self.rng.randrange(self.s.tenants)
            await self.upload_one(c, tenant)
            live = self.live(tenant)
            if len(live) > self.s.max_live:
                victim = live[0]
                victim.deleted_at = time.perf_counter()
                n = await c.with_key(self.keys[tenant]).delete_delta(victim.name)
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
            # Every other one by the clock (some land while queued or before the first token; a fast server
            # often finishes first: a 20 s run once saw no cancel at all), the others once some tokens
            # streamed: sure to cut the stream in the middle, whatever the load.
            self.cancels += 1
            if self.cancels % 2:
                req.cancel_after_s = rng.uniform(0.02, 1.0)
            else:
                req.max_new_tokens = max(req.max_new_tokens, 4)
                req.cancel_after_tokens = rng.randrange(1, req.max_new_tokens)
        elif behaviour == "deadline":
            req.max_new_tokens = s.output_len.hi  # long enough that most deadlines expire mid-stream
            req.timeout_s = rng.uniform(0.05, 0.6)
        self.counter += 1
        return req, target

    async def load(self, c: AsyncClient, duration_s: float, max_requests: int) -> int:
        """Poisson arrivals for ``duration_s`` (at most ``max_requests``), churn alongside; waits for all."""
        t0 = self.t0 = time.perf_counter()
        until = t0 + duration_s
        churn = asyncio.create_task(self.churn(c, until))
        abuse = asyncio.create_task(self.abuser.run(c, until)) if self.abuser and self.s.abuse_every_s else None
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
                timed_generate(c.with_key(self.keys[req.tenant]), req, t0, hard_timeout_s=self.s.hard_timeout_s))))
            sent += 1
        await churn
        if abuse is not None:
            await abuse
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
        if self.abuser is not None:
            bad = self.abuser.violations()
            if bad:
                raise Violation(f"abusive attempt: {bad[0]} ({len(bad)} in all)")
            outcomes.update({f"abuse:{k}": v for k, v in self.abuser.counts().items()})
        return outcomes

    def disk(self) -> dict:
        """The data dir as the server left it: scratch entries, blobs against the catalogue's digests, bytes."""
        data = Path(self.server.data_dir)
        blobs = {p.name: p.stat().st_size for p in (data / "blobs").glob("*/*") if p.is_file()}
        conn = sqlite3.connect(f"file:{data / 'catalogue.sqlite3'}?mode=ro", uri=True)
        try:
            referenced = {r[0] for r in conn.execute("SELECT DISTINCT digest FROM versions")}
        finally:
            conn.close()
        total = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        return {"tmp_entries": sum(1 for _ in (data / "tmp").iterdir()), "blob_files": len(blobs),
                "blob_mb": sum(blobs.values()) / 2**20, "orphan_blobs": len(set(blobs) - referenced),
                "missing_blobs": len(referenced - set(blobs)), "data_mb": total / 2**20}

    def gauges(self, m: Scrape) -> dict:
        return {"in_flight": m.value("deltaserve_requests_in_flight"), "running": m.value("deltaserve_scheduler_running"),
                "waiting": m.value("deltaserve_scheduler_waiting"), "kv_used": m.value("deltaserve_kv_blocks_in_use"),
                "pinned": m.value("deltaserve_delta_pinned"),
                "resident": m.value("deltaserve_delta_resident", tier="device"),
                "held_bytes": m.value("deltaserve_delta_device_memory_bytes", state="held"),
                "budget_bytes": m.value("deltaserve_delta_device_memory_bytes", state="budget"),
                "rss_mb": self.rss_mb()}

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    async def settle(self) -> dict:
        """Wait (bounded) until nothing is in flight, running or waiting; return the gauges and the disk."""
        deadline = time.monotonic() + self.s.settle_timeout_s
        while True:
            g = self.gauges(await asyncio.to_thread(scrape, self.server.metrics_url))
            if g["in_flight"] == 0 and g["running"] == 0 and g["waiting"] == 0 and g["pinned"] == 0:
                g.update(await asyncio.to_thread(self.disk))
                if g["tmp_entries"] == 0 or time.monotonic() > deadline:  # uploads cut by a client end their work
                    return g
            if time.monotonic() > deadline:
                raise Violation(f"server did not settle within {self.s.settle_timeout_s:.0f} s after the load: {g}")
            await asyncio.sleep(0.25)

    def check_end_state(self, base: dict, end: dict, m: Scrape) -> float:
        """After the load and the verification: nothing leaked. Returns the RSS limit applied (MB)."""
        bad = {k: v for k, v in m.by_label("deltaserve_rpcs_total", "code").items() if k in ("INTERNAL", "UNKNOWN") and v}
        if bad:
            methods = {lab.get("method"): v for lab, v in m.samples.get("deltaserve_rpcs_total", []) if lab.get("code") in bad}
            raise Violation(f"server counted RPCs ending {bad} (by method: {methods})")
        if end["kv_used"] > base["kv_used"]:
            raise Violation(f"KV blocks in use {end['kv_used']:.0f} after the soak, {base['kv_used']:.0f} at the baseline")
        live = len(self.live())
        if end["resident"] > live:
            raise Violation(f"{end['resident']:.0f} deltas resident on the device for {live} live deltas: deleted "
                            f"deltas kept their memory")
        if end["held_bytes"] > end["budget_bytes"]:
            raise Violation(f"deltas hold {end['held_bytes']:.0f} bytes of device memory, over the budget "
                            f"{end['budget_bytes']:.0f}")
        limit = base["rss_mb"] * (1 + self.s.rss_tolerance_frac) + self.s.rss_tolerance_mb
        if end["rss_mb"] > limit:
            raise Violation(f"server RSS {end['rss_mb']:.0f} MB after the soak, baseline {base['rss_mb']:.0f} MB "
                            f"(limit {limit:.0f} MB)")
        for state, when in ((base, "at the baseline"), (end, "after the soak")):
            if state["tmp_entries"] or state["orphan_blobs"] or state["missing_blobs"]:
                raise Violation(f"data dir {when}: {state['tmp_entries']} scratch entries, {state['orphan_blobs']} "
                                f"orphan and {state['missing_blobs']} missing blobs")
        grown = (end["data_mb"] - base["data_mb"]) - (end["blob_mb"] - base["blob_mb"])
        if grown > self.s.disk_slack_mb:
            raise Violation(f"data dir grew {grown:.1f} MB beyond its live blobs (limit {self.s.disk_slack_mb} MB)")
        return limit

    async def verify_deltas(self, c: AsyncClient) -> int:
        checked = 0
        if self.abuser is not None:  # refused, cancelled and deleted attempts stored nothing
            for key in (self.abuser.abuse_key, self.abuser.tight_key):
                left = [d.name for d in await c.with_key(key).list_deltas()]
                if left:
                    raise Violation(f"abusive uploads left deltas behind: {left[:5]}")
        for tenant in range(self.s.tenants):
            tc = c.with_key(self.keys[tenant])
            listed = {d.name: d for d in await tc.list_deltas(page_size=3)}  # small pages exercise paging
            expected = {d.name for d in self.live(tenant)}
            if set(listed) != expected:
                raise Violation(f"tenant {tenant}: ListDeltas gave {sorted(set(listed) - expected)} not expected and "
                                f"missed {sorted(expected - set(listed))}")
            for name in sorted(listed):
                info = await tc.get_delta(name)
                if info.name != name or not info.versions or not info.versions[-1].digest:
                    raise Violation(f"GetDelta {name}: bad reply (name {info.name!r}, {len(info.versions)} versions)")
                await tc.preload_delta(name, device=True)
                req = PlannedRequest(index=-1, at=0.0, tenant=tenant, delta=name, kind="verify", cold=False,
                                     prompt=[5, 6, 7, 8], max_new_tokens=4, seed=1)
                rec = await timed_generate(tc, req, time.perf_counter(), hard_timeout_s=self.s.hard_timeout_s)
                if rec.status != "OK" or rec.tokens != 4:
                    raise Violation(f"Generate on listed delta {name}: {rec.status} with {rec.tokens}/4 tokens "
                                    f"({rec.detail})")
                checked += 1
        return checked

    async def sample_rss(self, until: float, label: str) -> None:
        while time.perf_counter() < until:
            self.results.write({"phase": label, "t": time.time(), "rss_mb": self.rss_mb()})
            await asyncio.sleep(2.0)
