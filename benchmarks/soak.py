"""Soak test: a bounded mixed load on a loopback server, then checks that nothing was lost or leaked.

    python benchmarks/soak.py --duration 60            # exit 0 = pass; 1 = a violation (one line says which)

The load, for ``--duration`` seconds (and at most ``--max-requests`` Generate calls), all at once:
  * open-loop Poisson Generate calls from several tenants: plain ones on live deltas and on the base
    model; ones the client cancels mid-stream; ones with a deadline too short to finish; ones naming a
    delta deleted earlier;
  * churn: a new delta uploaded every ``--upload-every`` seconds (PEFT LoRA / (IA)3 archives and native
    bottleneck / BitFit files, identical payloads under several names, so blobs are shared), and the
    oldest deleted once a tenant holds more than ``--max-live`` (often while requests still use it);
  * more live deltas than the device budget holds, so deltas are evicted and reloaded all along;
  * abuse, one attempt every ``--abuse-every`` seconds (``load/abuse.py``): maximal text prompts, zip bombs,
    garbage uploads, uploads cancelled half-way, uploads past a byte quota, bursts past the upload slots.

Then it asserts, and exits non-zero with ``soak: FAIL <reason>`` on the first violation:
  1. every request ended, within a bound, with a status its behaviour allows (no UNKNOWN, INTERNAL,
     UNAVAILABLE, no hang; a plain request that finished produced all its tokens), every abusive attempt
     with the refusal it must get (a burst: exactly one refused, with a retry hint), storing nothing;
  2. the server settled: no request in flight, none running or waiting, no slot pinned, KV blocks in
     use back to the baseline, resident deltas no more than those still listed, within the budget;
  3. resident memory (psutil on the server pid) returned within a tolerance of the baseline taken after
     a warm-up of the same load, and the disk too: no scratch entry, no orphan or missing blob, the data
     dir grown by no more than its live blobs (plus ``disk_slack_mb`` for catalogue rows);
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
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from load.server_proc import ServerProcess, cuda_present  # noqa: E402  (stdlib only: imports no triton)

if not cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)

from common import Results  # noqa: E402
from server.client import AsyncClient  # noqa: E402
from load.abuse import Abuser  # noqa: E402
from load.mixed import RECIPES, Soak, SoakSettings, Violation  # noqa: E402
from load.prom import scrape  # noqa: E402
from load.record import CALL_TIMEOUT_S, GENEROUS_QUOTAS  # noqa: E402


async def run_soak(s: SoakSettings, server: ServerProcess, payloads: dict, results: Results, report: dict) -> None:
    """The whole soak; fills ``report`` as it goes (so a failure still reports what ran), raises Violation."""
    async with AsyncClient(server.address, server.admin_key, timeout=CALL_TIMEOUT_S) as c:
        keys = [(await c.create_tenant(f"soak-t{i}", quotas=GENEROUS_QUOTAS))[1] for i in range(s.tenants)]
        abuse_key = (await c.create_tenant("soak-abuser", quotas=GENEROUS_QUOTAS))[1]
        tight_key = (await c.create_tenant("soak-tight", quotas={**GENEROUS_QUOTAS, "max_delta_bytes": 1000}))[1]
        abuser = Abuser(abuse_key, tight_key, payloads[RECIPES[0]], s.server["max_uploads_per_tenant"],
                        random.Random(s.seed + 1), s.abuse_every_s)
        soak = Soak(s, server, keys, payloads, results, abuser)
        for i in range(s.tenants * ((s.max_live + 1) // 2)):
            await soak.upload_one(c, i % s.tenants)
        # warm-up with the same load, so the baseline holds what a steady server holds (allocator pools,
        # touched KV pages, the host tier at its working-set size)
        await soak.load(c, s.warmup_s, s.max_requests)
        soak.check_records()
        report["baseline"] = base = await soak.settle()
        soak.records.clear()
        abuser.records.clear()
        sampler = asyncio.create_task(soak.sample_rss(time.perf_counter() + s.duration_s, "rss"))
        report["requests"] = await soak.load(c, s.duration_s, s.max_requests)
        sampler.cancel()
        report.update(uploads=soak.uploads, deletes=soak.deletes)
        report["outcomes"] = dict(sorted(soak.check_records().items()))
        await soak.settle()
        report["verified_deltas"] = await soak.verify_deltas(c)
        report["end"] = end = await soak.settle()
        report.update(live_deltas=len(soak.live()), rss_growth_mb=end["rss_mb"] - base["rss_mb"])
        report["rss_limit_mb"] = soak.check_end_state(base, end, await asyncio.to_thread(scrape, server.metrics_url))


def parse_args(argv=None) -> tuple[SoakSettings, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of mixed load after the warm-up")
    p.add_argument("--max-requests", type=int, default=5000, help="bound on Generate calls in the soak phase")
    p.add_argument("--rate", type=float, default=4.0, help="Generate arrivals per second")
    p.add_argument("--upload-every", type=float, default=1.5, help="seconds between uploads")
    p.add_argument("--max-live", type=int, default=5, help="live deltas per tenant before the oldest is deleted")
    p.add_argument("--warmup", type=float, default=0.0, help="warm-up seconds (0: a quarter of --duration, 4-15 s)")
    p.add_argument("--rss-tolerance-mb", type=float, default=64.0, help="RSS growth allowed on top of --rss-tolerance")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="RSS growth allowed, as a fraction of the baseline")
    p.add_argument("--abuse-every", type=float, default=2.0, help="seconds between abusive attempts (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", help="results folder (default benchmarks/results, or BENCH_RESULTS_DIR)")
    a = p.parse_args(argv)
    try:
        return SoakSettings(duration_s=a.duration, max_requests=a.max_requests, rate=a.rate,
                            upload_every_s=a.upload_every, max_live=a.max_live, warmup_s=a.warmup,
                            rss_tolerance_mb=a.rss_tolerance_mb, rss_tolerance_frac=a.rss_tolerance,
                            abuse_every_s=a.abuse_every, seed=a.seed), a.out_dir
    except ValueError as exc:
        p.error(str(exc))


def main(argv=None) -> int:
    s, out_dir = parse_args(argv)
    t_start = time.perf_counter()
    results = Results(__file__, asdict(s), out_dir=out_dir)
    verdict, report = "pass", {}  # run_soak fills report as it goes
    with tempfile.TemporaryDirectory(prefix="deltaserve-soak-") as tmp:
        from server.demo import ensure_demo_model

        model_dir = ensure_demo_model(tmp)[0]
        server = ServerProcess(tmp, s.server).launch()
        try:
            from load.payloads import DeltaFactory

            factory = DeltaFactory(model_dir)  # while the server loads
            payloads = {r: factory.build(r, seed=k).data for k, r in enumerate(RECIPES)}
            server.wait_ready()
            asyncio.run(run_soak(s, server, payloads, results, report))
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
    abuse = (lambda kind: sum(v for k, v in o.items() if k.startswith(f"abuse:{kind}:")))
    end, base = report.get("end", {}), report.get("baseline", {})
    results.summary(result="pass" if verdict == "pass" else "fail", duration_s=s.duration_s,
                    requests=report.get("requests", 0),
                    ok=sum(v for k, v in o.items() if k.endswith(":OK") and not k.startswith("abuse:")),
                    cancelled=sum(v for k, v in o.items() if k.endswith(":CANCELLED") and not k.startswith("abuse:")),
                    deadline_exceeded=count("DEADLINE_EXCEEDED"), not_found=count("NOT_FOUND"),
                    uploads=report.get("uploads", 0), deletes=report.get("deletes", 0),
                    big_prompts=abuse("big_prompt"), zip_bombs=abuse("zip_bomb"), garbage_uploads=abuse("garbage"),
                    upload_cancels=abuse("upload_cancel"), over_quota=abuse("over_quota"),
                    upload_bursts=abuse("upload_burst"),
                    verified_deltas=report.get("verified_deltas", 0),
                    rss_growth_mb=round(report.get("rss_growth_mb", float("nan")), 1),
                    disk_growth_mb=round(end.get("data_mb", float("nan")) - base.get("data_mb", float("nan")), 1),
                    blob_growth_mb=round(end.get("blob_mb", float("nan")) - base.get("blob_mb", float("nan")), 1),
                    tmp_entries_end=end.get("tmp_entries", "nan"), orphan_blobs_end=end.get("orphan_blobs", "nan"),
                    kv_blocks_end=end.get("kv_used", "nan"), wall_s=round(time.perf_counter() - t_start, 1))
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
