"""Delta store: import and load throughput, and the time to make one delta ready at each tier.

Points (each a JSON line; ratios are the result, DESIGN.md "Benchmark conventions"):

* ``import_native`` / ``import_peft_tgz``: ``store.put`` of a rank-16 LoRA on all seven projections
  of the Llama-shaped benchmark model, as a native file and as a tar.gz of the PEFT folder
  (extract, convert, validate, serialise, hash, fsync, commit). MB/s of the native bytes.
* ``raw_read``: the baseline: read the same blob file and ``safetensors.torch.load`` it, nothing else.
* ``load_disk``: ``store.load`` with the host tier empty (read, sha256, parse); ``load_host``: a hit.
* ``ready_cold`` (disk) / ``ready_warm`` (host) / ``ready_hot`` (resident): from ``residency.lookup(key)``
  to a slot id, through the background load (validation and staging included) and the owner's ``step``
  (the copy into the DeltaModel's arenas), as the engine's step loop sees it. The OS page cache is not dropped (that needs root):
  "disk" means the blob is read and verified from a file, not that the bytes come off the platter.
  ``install_ms`` is the mean time of the owner's install (the copy into the arenas).

    python benchmarks/bench_store.py --quick     # < 1 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # must precede any triton import (transformers imports it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_model import PROJECTIONS, build_model  # noqa: E402
from benchmarks.common import Results, sync  # noqa: E402
from delta_store import BaseSpec, DeltaStore  # noqa: E402
from delta_store.native import dump_native  # noqa: E402
from delta_store.validate import Limits  # noqa: E402
from server.deltas import wrap_model  # noqa: E402
from server.deltas.residency import Residency  # noqa: E402
from tests.helpers import random_delta, store_settings  # noqa: E402

RANK = 16


def median_ms(fn, repeats: int, before=None) -> dict:
    """Median of ``repeats`` single calls, each after an untimed ``before()`` (tier reset)."""
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(samples), "ms_min": min(samples), "ms_max": max(samples), "repeats": repeats}


def peft_archive(base: torch.nn.Module, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(PROJECTIONS)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    folder = out / "peft_adapter"
    pm.save_pretrained(folder)
    archive = out / "peft_adapter.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU run under a minute")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads: the store path is copies, hashing and file I/O, and OpenMP "
                         "spin-waits on a shared 2-core VM inflated dm.set_delta 10x (26 ms -> 2.4 s) at 2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 25)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    base = build_model(torch.device("cpu"), torch.float32, layers=4)
    spec = BaseSpec.from_model(base)
    res = Results(__file__, {"rank": RANK, "targets": list(PROJECTIONS), "hidden": spec.hidden_size,
                             "layers": spec.num_layers, "repeats": repeats, "quick": args.quick,
                             "device": str(device), "dtype": str(dtype), "threads": args.threads})
    work = Path(tempfile.mkdtemp(prefix="bench_store-"))
    delta = random_delta(spec, rank=RANK, targets=PROJECTIONS, seed=0)
    native = work / "delta.safetensors"
    native.write_bytes(dump_native(delta))
    mb = native.stat().st_size / 1e6
    archive = peft_archive(base, work)
    dm = wrap_model(copy.deepcopy(base).to(device, dtype), max_slots=4, max_rank=RANK, max_bottleneck=8)
    del base

    with DeltaStore.open(work / "data", spec, Limits(max_rank=RANK), store_settings(host_cache_bytes=1 << 30)) as store:
        tenant, _ = store.tenants.create("bench")
        counter = iter(range(10 ** 6))
        imp_native = median_ms(lambda: store.put(tenant, f"n{next(counter)}", native), repeats)
        imp_peft = median_ms(lambda: store.put(tenant, f"p{next(counter)}", archive), max(3, repeats // 3))
        version = store.resolve(tenant, "n0")
        blob = store.blobs.path(version.digest)
        from safetensors.torch import load

        raw = median_ms(lambda: load(blob.read_bytes()), repeats)
        disk = median_ms(lambda: store.load(version), repeats, before=lambda: store.host.discard(version.digest))
        host = median_ms(lambda: store.load(version), repeats)

        slots = Residency(dm, store.load_key, 4 * dm.footprint(delta))
        key = version.key

        def ready() -> None:
            """What the step loop sees: lookup until the delta is resident (the owner's step installs it)."""
            while slots.lookup(key) is None:
                slots.step()
                time.sleep(0.0002)  # yield the GIL to the load worker, as the engine's other work would
            sync(device)

        def evict(cold: bool) -> None:
            slots.invalidate(key)  # unpinned: freed by the next step
            slots.step()
            if cold:
                store.host.discard(key.digest)

        # Round-robin (one sample of each tier per round): machine drift hits all three alike.
        samples: dict[str, list[float]] = {"cold": [], "warm": [], "hot": []}
        for _ in range(repeats):
            for tier in ("cold", "warm", "hot"):
                if tier != "hot":
                    evict(tier == "cold")
                t0 = time.perf_counter()
                ready()
                samples[tier].append((time.perf_counter() - t0) * 1e3)
        cold, warm, hot = ({"ms": statistics.median(v), "ms_min": min(v), "ms_max": max(v), "repeats": repeats}
                           for v in samples.values())
        slot_stats = slots.stats()
        slots.close()
        res.write({"point": "residency_stats", "loads": slot_stats.loads, "load_seconds": slot_stats.load_seconds,
                   "install_seconds": slot_stats.install_seconds, "hits": slot_stats.hits,
                   "misses": slot_stats.misses})
        install_ms = slot_stats.install_seconds * 1e3 / max(1, slot_stats.loads)

    points = {"import_native": imp_native, "import_peft_tgz": imp_peft, "raw_read": raw, "load_disk": disk,
              "load_host": host, "ready_cold": cold, "ready_warm": warm, "ready_hot": hot}
    for name, p in points.items():
        res.write({"point": name, **p, "mb": mb, "mb_per_s": mb / (p["ms"] / 1e3) if p["ms"] > 0 else None})
        print(f"{name:16s} {p['ms']:9.3f} ms  (min {p['ms_min']:.3f}, max {p['ms_max']:.3f})")
    res.summary(delta_mb=mb, import_native_ms=imp_native["ms"], import_peft_ms=imp_peft["ms"],
                import_mb_s=mb / (imp_native["ms"] / 1e3), load_disk_mb_s=mb / (disk["ms"] / 1e3),
                disk_load_over_raw_read=disk["ms"] / raw["ms"], cold_ms=cold["ms"], warm_ms=warm["ms"],
                hot_ms=hot["ms"], cold_over_hot=cold["ms"] / hot["ms"], warm_over_hot=warm["ms"] / hot["ms"],
                cold_over_warm=cold["ms"] / warm["ms"], install_ms=install_ms)


if __name__ == "__main__":
    main()
