"""bench_serving's saturation workload replayed in-process: what the engine alone makes of the served mix.

    python benchmarks/replay_serving.py --shape cpu      # ~3 min on 2 CPU cores
    python benchmarks/replay_serving.py --shape demo --deltas 4 --requests 8 --rounds 1   # seconds

Same model (a random Llama of ``--shape``, the demo builder), same deltas (the first ``--deltas`` recipes of
``load/payloads.py``, built with PEFT and imported through a DeltaStore as an upload would be), same requests
(``load/workload.make_plan`` with bench_serving's settings: log-normal prompts of 8-192 tokens, outputs of 4-64,
uniform popularity), but no server: every request is queued at once and ``Engine.step`` runs until all finish,
each step timed on this process's CPU clock (one torch thread), the base model alone on the same requests
in each round (``--threads`` other than 1: the server's split, base matmuls on that many threads and the delta ops
on one, with the wall-clock ratio beside). ``ratio_vs_base`` against bench_serving's ``cpu_ratio_vs_base`` at the
same delta count is what the served path (gRPC, asyncio, detokenizing, metrics, threads) costs on top of the engine
(docs/PROFILE.md).

The byte floor of the served mix (``--floor-steps``, 0 to skip): one sequence on each resident delta, all of them in
every step, the median decode step with the deltas against the same step on the base model alone, and the time the
deltas' bytes (every term of every one, in the served dtype) take to read once at this machine's copy bandwidth
(``byte_floor.copy_bandwidth``, one thread): ``floor_ratio_vs_base`` = base / (base + floor) is the best a
decode step of that mix can do here, ``achieved_vs_floor`` = (deltas - base) / floor how far the delta work is
from it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)
os.environ.setdefault("DELTASERVE_KERNELS", "cpu")  # the CPU serving path, as bench_serving's server runs

import torch  # noqa: E402

from common import Results  # noqa: E402
from load.models import SHAPES  # noqa: E402
from load.workload import (OUTPUT_LEN, PROMPT_LEN, DeltaRef, PlannedRequest, WorkloadConfig, as_base,  # noqa: E402
                           fresh_prompts, make_plan)


def build(shape: str, num_deltas: int, tmp: Path):
    """(engine, {delta name: key}, refs, vocab, store, {key: Delta}) for a random Llama of ``shape`` with
    ``num_deltas`` resident deltas."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from delta_store.store import DeltaStore
    from load.payloads import DeltaFactory, recipe_mix
    from server.app import store_config
    from server.config import ServerConfig
    from server.deltas import wrap_model
    from server.deltas.residency import Residency
    from server.demo import build_demo_model
    from server.engine import Engine, ModelRunner

    mdir = build_demo_model(tmp / "model", **SHAPES[shape])
    factory = DeltaFactory(mdir)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(mdir)
    cfg = ServerConfig(data_dir=str(tmp / "data"), max_bottleneck=64, kv_blocks=4096, max_model_len=2048)
    dm = wrap_model(model, max_slots=cfg.max_running, max_rank=cfg.max_rank, max_bottleneck=cfg.max_bottleneck,
                    max_tokens=cfg.max_batch_tokens)
    limits, settings = store_config(cfg, pin_host_memory=False)
    store = DeltaStore.open(tmp / "data", dm.spec, limits, settings)
    tenant, _key = store.tenants.create("replay")
    refs = [DeltaRef(0, f"w{i:03d}-{r}", r) for i, r in enumerate(recipe_mix(num_deltas))]
    keys = {}
    for k, ref in enumerate(refs):
        path = tmp / f"{ref.name}.bin"
        path.write_bytes(factory.build(ref.kind, seed=1000 + k).data)  # bench_serving's seeds
        keys[ref.name] = store.put(tenant, ref.name, path).key
    deltas = {key: store.load_key(key) for key in keys.values()}
    residency = Residency(dm, deltas.__getitem__, 2 * sum(dm.footprint(d) for d in deltas.values()))
    futures = [residency.request(key, notify=True) for key in deltas]
    while not all(f.done() for f in futures):  # every delta resident before timing, as bench_serving's warm-up
        time.sleep(0.001)
        residency.step()
    engine = Engine(cfg, ModelRunner(dm, tokenizer, cfg), residency)
    return engine, keys, refs, factory.spec.vocab_size, store, deltas


def queue(engine, plan, keys: dict, tag: str) -> None:
    """Every request of ``plan`` added to ``engine`` at once (greedy, every requested token)."""
    from server.types import GenerationRequest, SamplingParams

    for p in plan:
        engine.add_request(GenerationRequest(f"{tag}-{p.index}", "replay", p.prompt,
                                             SamplingParams(max_new_tokens=p.max_new_tokens, temperature=0,
                                                            ignore_eos=True),
                                             delta=keys[p.delta] if p.delta else None))


def serve(engine, plan, keys: dict, tag: str) -> tuple[float, float, int]:
    """All of ``plan`` queued at once, stepped to the end: (CPU seconds, wall seconds, generated tokens)."""
    queue(engine, plan, keys, tag)
    cpu_s, tokens, w0 = 0.0, 0, time.perf_counter()
    while engine.scheduler.has_work():
        t0 = time.process_time()
        outs = engine.step()
        cpu_s += time.process_time() - t0
        tokens += sum(len(o.token_ids) for o in outs)
    return cpu_s, time.perf_counter() - w0, tokens


def delta_bytes(deltas, element_size: int) -> int:
    """Bytes of every term of every one of ``deltas`` at ``element_size`` bytes an element: what a decode step with
    one token on each of them reads at least once."""
    return sum(t.numel() * element_size for d in deltas for md in d.modules.values() for t in md.tensors().values())


def decode_steps(engine, refs: list[DeltaRef], keys: dict, vocab: int, steps: int, salt: int,
                 with_deltas: bool) -> float:
    """Median CPU seconds of ``steps`` decode steps of one sequence per delta of ``refs`` (on the base model alone
    unless ``with_deltas``), after their prefill; the sequences then run to their end."""
    plan = [PlannedRequest(i, 0.0, 0, ref.name if with_deltas else "", ref.kind, False, [0] * (20 + i), steps + 2, 0)
            for i, ref in enumerate(refs)]
    queue(engine, fresh_prompts(plan, salt, vocab), keys, f"floor{salt}")  # fresh tokens: no prefix-cache hit
    sched = engine.scheduler
    while sched.num_waiting or any(not s.output_ids for s in sched.running):
        engine.step()  # prefill (and the first token) of every sequence
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        engine.step()
        times.append(time.process_time() - t0)
    while engine.scheduler.has_work():
        engine.step()
    return statistics.median(times)


def floor_point(engine, refs: list[DeltaRef], keys: dict, vocab: int, loaded: dict, res, steps: int) -> dict:
    from byte_floor import copy_bandwidth

    gbs = copy_bandwidth(res, "cpu")
    nbytes = delta_bytes(loaded.values(), next(engine.runner.model.parameters()).element_size())
    base = statistics.median(decode_steps(engine, refs, keys, vocab, steps, 1000 + r, False) for r in range(2))
    deltas = statistics.median(decode_steps(engine, refs, keys, vocab, steps, 2000 + r, True) for r in range(2))
    floor = nbytes / (gbs * 1e9)
    row = {"phase": "decode_floor", "sequences": len(keys), "delta_bytes": nbytes, "copy_gbs": gbs,
           "base_step_ms": 1e3 * base, "delta_step_ms": 1e3 * deltas, "floor_ms": 1e3 * floor,
           "step_ratio_vs_base": base / deltas, "floor_ratio_vs_base": base / (base + floor),
           "achieved_vs_floor": (deltas - base) / floor}
    res.write(row)
    print(f"decode step of {len(keys)} sequences, one per delta: base {1e3 * base:.1f} ms, deltas "
          f"{1e3 * deltas:.1f} ms (x{base / deltas:.3f}); {nbytes / 1e6:.1f} MB of deltas read once at {gbs:.1f} GB/s "
          f"= {1e3 * floor:.1f} ms: "
          f"floor x{row['floor_ratio_vs_base']:.3f} of base, delta work x{row['achieved_vs_floor']:.2f} of its floor",
          flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--deltas", type=int, default=32, help="distinct deltas (bench_serving's top sweep point)")
    ap.add_argument("--requests", type=int, default=48, help="requests per phase (bench_serving --quick: 48)")
    ap.add_argument("--rounds", type=int, default=2, help="base / deltas pairs; the median of each is taken")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server runs torch's default, "
                    "the delta ops on one: kernels/cpu/threads.py); the summary adds the wall-clock ratio")
    ap.add_argument("--floor-steps", type=int, default=20, help="decode steps timed for the byte-floor point (0: skip)")
    ap.add_argument("--out-dir", help="results folder (default benchmarks/results, or BENCH_RESULTS_DIR)")
    args = ap.parse_args(argv)
    if args.deltas < 1 or args.requests < 1 or args.rounds < 1 or args.threads < 1 or args.floor_steps < 0:
        ap.error("--deltas, --requests, --rounds and --threads must be >= 1, --floor-steps >= 0")
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(args.threads)  # default 1: CPU time of one thread, what a neighbour's load cannot inflate
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltaserve-replay-") as tmp:
        engine, keys, refs, vocab, store, deltas = build(args.shape, args.deltas, Path(tmp))
        try:
            cfg = WorkloadConfig(rate=1000.0, duration_s=60.0, max_requests=args.requests, popularity="uniform",
                                 num_deltas=args.deltas, prompt_len=PROMPT_LEN, output_len=OUTPUT_LEN,
                                 vocab_size=vocab, seed=3)  # bench_serving's saturation plan seed
            plan = make_plan(cfg, refs)
            res = Results(__file__, {**vars(args), "clock": "process_cpu_time"}, out_dir=args.out_dir)
            serve(engine, plan[:8], keys, "warm")  # first-call paths, allocator
            tps, wall = {"base": [], "deltas": []}, {"base": [], "deltas": []}
            salt = 0
            for r in range(args.rounds):
                for variant, p in (("base", as_base(plan)), ("deltas", plan)):
                    salt += 1  # each replay its own prompt tokens: no prefix-cache hit on an earlier round's KV
                    cpu_s, wall_s, tokens = serve(engine, fresh_prompts(p, salt, vocab), keys, f"{variant}{r}")
                    tps[variant].append(tokens / cpu_s)
                    wall[variant].append(tokens / wall_s)
                    res.write({"phase": f"{variant}_{r}", "variant": variant, "tokens": tokens, "cpu_s": cpu_s,
                               "wall_s": wall_s, "tok_per_cpu_s": tokens / cpu_s, "tok_per_s": tokens / wall_s})
                    print(f"{variant:6s} round {r}: {tokens / cpu_s:8.1f} tok/CPU-s, {tokens / wall_s:8.1f} tok/s "
                          f"({tokens} tokens)", flush=True)
            ratio = statistics.median(tps["deltas"]) / statistics.median(tps["base"])
            wall_ratio = statistics.median(wall["deltas"]) / statistics.median(wall["base"])
            floor = floor_point(engine, refs, keys, vocab, deltas, res, args.floor_steps) if args.floor_steps else {}
            res.write({"phase": "summary", "ratio_vs_base": ratio, "wall_ratio_vs_base": wall_ratio,
                       "tok_per_cpu_s": tps, "tok_per_s": wall})
        finally:
            engine.residency.close()
            store.close()
            torch.set_num_threads(threads)
            torch.set_grad_enabled(grad)
    extra = {k: floor[k] for k in ("floor_ratio_vs_base", "step_ratio_vs_base", "achieved_vs_floor", "copy_gbs")
             if k in floor}
    res.summary(ratio_vs_base=ratio, wall_ratio_vs_base=wall_ratio, threads=args.threads, num_deltas=args.deltas,
                shape=args.shape, **extra,
                wall_s=time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
