"""Replicas behind nginx: delta affinity (consistent hashing on the delta header) against round robin.

Three ``deltaserve serve`` replicas (subprocesses) share one PostgreSQL catalogue and one S3 bucket
(moto's server), all on loopback, and sit behind two nginx fronts started from the shipped
``deploy/nginx/deltaserve.conf``: one as shipped (``hash ... consistent`` on the delta header), one
with the hash line removed (nginx's round robin). Each replica's device memory holds ``--device-deltas``
deltas; the workload is a zipf draw over ``--deltas`` distinct deltas, more than one replica holds,
so where a request lands decides whether its delta is resident there.

Each phase uses its own set of deltas (the same zipf sequence mapped to that set's names), so both
start with none of their deltas resident. Per phase, from the replicas' own Prometheus counters:

* ``device_hit_rate``: requests whose delta was resident in the serving replica's device memory when the
  scheduler first asked for it / all requests (``deltaserve_delta_admissions_total{resident}``). A request
  that arrives while its delta is loading there waits for that load: no hit. (The slot manager's own
  hits count every acquire answered by a resident slot, the one after a load too; written as
  ``slot_lookup_hit_rate`` for reference.)
* ``cold_loads_per_1k``: deltas brought into device memory per 1000 requests.

On 2 cores the replicas share the CPU, so throughput is not the figure here; hit rate and cold loads
are. The last line is ``summary: affinity_device_hit_rate=... roundrobin_device_hit_rate=...
affinity_cold_loads_per_1k=... roundrobin_cold_loads_per_1k=... errors=...`` (target: affinity's
hit rate at least 1.5x round robin's).

    python benchmarks/bench_replicas.py --quick     # < 5 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # must precede any triton import (transformers imports it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Results  # noqa: E402
from server.client import REPLICA_HEADER, AsyncClient, Client  # noqa: E402
from server.demo import build_demo_model  # noqa: E402
from tests.replica_harness import ReplicaSet  # noqa: E402
from tests.server_harness import peft_lora, peft_lora_footprint  # noqa: E402
from tests.services import MotoS3, Postgres, postgres_bindir  # noqa: E402

PROMPT = [3 + b for b in b"tell me"]  # the demo model's byte-level tokenizer: byte b -> id 3 + b


def zipf_sequence(n_requests: int, n_deltas: int, s: float, seed: int) -> list[int]:
    """Delta indices drawn with P(k) ~ 1 / (k + 1)^s (index 0 the most popular)."""
    weights = [1.0 / (k + 1) ** s for k in range(n_deltas)]
    return random.Random(seed).choices(range(n_deltas), weights=weights, k=n_requests)


def device_counters(text: str) -> dict[str, float]:
    """The device tier's admission, lookup and load counters from one replica's /metrics."""
    patterns = {"resident": r'deltaserve_delta_admissions_total\{resident="yes"\}',
                "waited": r'deltaserve_delta_admissions_total\{resident="no"\}',
                "hits": r'deltaserve_delta_cache_hits_total\{tier="device"\}',
                "misses": r'deltaserve_delta_cache_misses_total\{tier="device"\}',
                "loads": r'deltaserve_delta_loads_total\{tier="device"\}'}
    out = {}
    for name, pattern in patterns.items():
        m = re.search(rf"^{pattern} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def scrape(replicas: ReplicaSet) -> list[dict[str, float]]:
    return [device_counters(r.metrics()) for r in replicas.replicas]


async def run_phase(front: str, key: str, names: list[str], sequence: list[int], concurrency: int,
                    max_new_tokens: int) -> tuple[int, dict[str, Counter], float]:
    """Send the sequence through ``front`` with ``concurrency`` requests in flight; returns (errors,
    delta -> Counter of serving replicas, seconds)."""
    served: dict[str, Counter] = defaultdict(Counter)
    errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in sequence:
        queue.put_nowait(names[i])

    async def worker(client: AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            name = queue.get_nowait()
            call = client.generate(PROMPT, delta=name, max_new_tokens=max_new_tokens, temperature=0.0,
                                   ignore_eos=True, timeout=120)
            try:
                async for _ in call:
                    pass
                meta = dict(await call.initial_metadata())
                served[name][meta.get(REPLICA_HEADER, "?")] += 1
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                errors += 1
                print(f"  error on {name}: {exc}", file=sys.stderr)

    t0 = time.perf_counter()
    async with AsyncClient(front, key) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return errors, served, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI-sized run, under 5 minutes on 2 cores")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--device-deltas", type=int, default=4,
                    help="deltas each replica's device memory holds (delta_memory_bytes = this x one delta's "
                         "footprint)")
    ap.add_argument("--deltas", type=int, default=None, help="distinct deltas per phase")
    ap.add_argument("--requests", type=int, default=None, help="requests per phase")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_deltas = args.deltas or (24 if args.quick else 48)
    n_requests = args.requests or (240 if args.quick else 1000)
    settings = dict(vars(args), deltas=n_deltas, requests=n_requests)
    res = Results(__file__, settings)
    t_start = time.perf_counter()

    bindir = postgres_bindir()
    if bindir is None:
        sys.exit("bench_replicas: PostgreSQL server binaries not found (apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    model_dir = build_demo_model(root / "model", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    postgres, moto = Postgres(bindir), MotoS3()
    replicas = None
    try:
        replicas = ReplicaSet(root / "set", model_dir, postgres, moto, n=args.replicas, round_robin_front=True,
                              delta_memory_bytes=args.device_deltas * peft_lora_footprint(model_dir),
                              max_running=args.concurrency * 2)
        print(f"{args.replicas} replicas up in {time.perf_counter() - t_start:.0f} s; front {replicas.front}, "
              f"round robin {replicas.round_robin.address}")
        with Client(replicas.front, replicas.admin_key, timeout=60) as admin:
            _tenant, key = admin.create_tenant("bench", quotas={"max_deltas": 4 * n_deltas,
                                                                "requests_per_minute": 100_000,
                                                                "tokens_per_minute": 10_000_000})
        sequence = zipf_sequence(n_requests, n_deltas, args.zipf, args.seed)
        phases = {}
        for phase, front in (("affinity", replicas.front), ("roundrobin", replicas.round_robin.address)):
            names = [f"{phase}-{k:03d}" for k in range(n_deltas)]
            with Client(front, key, timeout=60) as c:
                for k, name in enumerate(names):
                    c.upload(name, peft_lora(model_dir, seed=1000 * (phase == "roundrobin") + k)[0])
            before = scrape(replicas)
            errors, served, seconds = asyncio.run(run_phase(front, key, names, sequence, args.concurrency,
                                                            args.max_new_tokens))
            after = scrape(replicas)
            delta = {k: sum(a[k] - b[k] for a, b in zip(after, before)) for k in after[0]}
            lookups = delta["hits"] + delta["misses"]
            admitted = delta["resident"] + delta["waited"]
            one_replica = sum(1 for c in served.values() if len(c) == 1) / max(1, len(served))
            point = {"point": phase, "requests": n_requests, "errors": errors, "seconds": seconds,
                     "admitted_resident": delta["resident"], "admitted_after_load": delta["waited"],
                     "slot_hits": delta["hits"], "slot_misses": delta["misses"], "device_loads": delta["loads"],
                     "device_hit_rate": delta["resident"] / admitted if admitted else 0.0,
                     "slot_lookup_hit_rate": delta["hits"] / lookups if lookups else 0.0,
                     "cold_loads_per_1k": 1000.0 * delta["loads"] / n_requests,
                     "deltas_served_by_one_replica": one_replica,
                     "requests_per_replica": dict(sum(served.values(), Counter()))}
            res.write(point)
            phases[phase] = point
            print(f"{phase:10s} hit rate {point['device_hit_rate']:.3f}  cold loads/1k {point['cold_loads_per_1k']:6.1f}"
                  f"  deltas on one replica {one_replica:.2f}  errors {errors}  {seconds:.0f} s  "
                  f"per replica {point['requests_per_replica']}")
    finally:
        if replicas is not None:
            replicas.close()
        moto.close()
        postgres.close()
    a, r = phases["affinity"], phases["roundrobin"]
    res.write({"point": "wall", "seconds": time.perf_counter() - t_start})
    res.summary(affinity_device_hit_rate=a["device_hit_rate"], roundrobin_device_hit_rate=r["device_hit_rate"],
                affinity_cold_loads_per_1k=a["cold_loads_per_1k"], roundrobin_cold_loads_per_1k=r["cold_loads_per_1k"],
                hit_rate_ratio=a["device_hit_rate"] / r["device_hit_rate"] if r["device_hit_rate"] else float("inf"),
                errors=a["errors"] + r["errors"])


if __name__ == "__main__":
    main()
