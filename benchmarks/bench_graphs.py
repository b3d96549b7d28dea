"""CUDA graphs on vs off (``ServerConfig.cuda_graphs``): decode tokens/s of the same engine workload, both in one run.

Two engines over one wrapped model and one residency (every delta resident before timing), identical but for
the switch; each variant runs on both, round-robin (off, on, on, off, ...), and each point is the ratio
on / off of the same round:

* "uniform" (bench_engine's workload 1 shape, decode-heavy): 32 concurrent requests, 16-token prompts, 32 new
  tokens, on the base model alone, 1 and 32 distinct LoRA r16 deltas on all seven projections, and the mix of
  kinds (LoRA r4-r32, LoRA + bias, BitFit, (IA)3, bottleneck adapters, base rows); hidden 4096 on CUDA;
* "deep" (bench_engine's workload 3): the 30-layer SmolLM2-135M shape, one request, 64 new tokens, base and one
  LoRA r8 on q/v/o: batch 1, where launch latency is nearly the whole step.

Every request is greedy: the graph-on engine must produce the graph-off tokens (``token_mismatches`` counts the
requests that differ; they may differ only by bf16 rounding reordering a near tie). ``graphs_captured`` and
``graphs_replayed`` say the graphs were used at all. Needs CUDA (the switch is refused elsewhere).

    python benchmarks/bench_graphs.py --quick     # ~1-2 min on one H100/H200 (capture included)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_engine import DEEP_SHAPE, DEEP_TARGETS, MIX_SLOTS, NUM_DELTAS, key, mixed_deltas  # noqa: E402
from benchmarks.bench_engine import resident_slots, serve_on, uniform_requests  # noqa: E402
from benchmarks.bench_model import build_model, random_lora_delta  # noqa: E402
from benchmarks.common import Results, step_clock, timed_once  # noqa: E402
from delta_store.delta import Delta, LoraTerm, ModuleDelta  # noqa: E402
from delta_store.records import DeltaKey  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.deltas import DeltaLinear, wrap_model  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.engine.model_runner import ModelRunner  # noqa: E402
from server.types import GenerationRequest, SamplingParams  # noqa: E402


def engines(dm, slots, config_kw: dict) -> dict[str, Engine]:
    out = {}
    for name, on in (("off", False), ("on", True)):
        config = ServerConfig(**config_kw, cuda_graphs=on, device="cuda")
        out[name] = Engine(config, ModelRunner(dm, None, config), slots)
    return out


def serve(engine: Engine, requests: list[GenerationRequest], clock) -> tuple[float, list[list[int]]]:
    """All requests at once, stepped to completion: (seconds of steps, each request's tokens in request order)."""
    for r in requests:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    total = 0.0
    while engine.scheduler.has_work():
        outs = []
        total += clock(lambda: outs.extend(engine.step()))
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
    return total, [tokens[r.request_id] for r in requests]


def compare(res: Results, workload: str, eng: dict[str, Engine], variants: dict, rounds: int, clock) -> dict:
    """Each variant on both engines, round-robin; returns variant -> median on/off tokens/s ratio."""
    out, mismatches = {}, 0
    for v, make in variants.items():
        for e in eng.values():  # warm: capture, autotuning, first-call paths
            serve(e, make("warm"), clock)
        tps = {"off": [], "on": []}
        for r in range(rounds):
            got = {}
            for state in (("off", "on") if r % 2 == 0 else ("on", "off")):
                wall, got[state] = serve(eng[state], make(f"r{r}-{state}"), clock)
                tps[state].append(sum(map(len, got[state])) / wall)
            mismatches += sum(a != b for a, b in zip(got["on"], got["off"]))
        ratio = statistics.median(a / b for a, b in zip(tps["on"], tps["off"]))
        graphs = eng["on"].runner.graphs
        res.write({"workload": workload, "variant": v, "tokens_per_s_off": statistics.median(tps["off"]),
                   "tokens_per_s_on": statistics.median(tps["on"]), "samples_off": tps["off"],
                   "samples_on": tps["on"], "speedup_on_vs_off": ratio, "graphs_captured": graphs.captures,
                   "graphs_replayed": graphs.replays, "graphs_disabled": graphs.disabled})
        print(f"{workload:7s} {v:8s} off {statistics.median(tps['off']):8.1f} tok/s  on "
              f"{statistics.median(tps['on']):8.1f} tok/s  x{ratio:.3f}", flush=True)
        out[v] = ratio
    out["mismatches"] = mismatches
    return out


def uniform_variants() -> dict:
    """bench_engine's workload 1 (its ``uniform_requests``), as request lists per variant."""
    return {v: (lambda tag, v=v: [r for _, r in uniform_requests(v, tag)])
            for v in ("base", "lora_1", "lora_32", "mix")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds per point instead of 7")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_graphs: CUDA graphs need a CUDA device (none here); nothing measured", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    device, dtype = torch.device("cuda"), torch.bfloat16
    clock = step_clock(device)
    timed = lambda fn: timed_once(fn, device, clock)  # noqa: E731
    rounds = 3 if args.quick else 7
    res = Results(__file__, settings=dict(quick=args.quick, layers=args.layers, dtype=str(dtype), clock="wall"))

    bare = build_model(device, dtype, args.layers)
    dm = wrap_model(bare, max_slots=64, max_rank=32, max_bottleneck=64, max_tokens=1024)
    deltas = {key(i): random_lora_delta(dm, 16, seed=i) for i in range(NUM_DELTAS)}
    deltas.update({key(s): d for s, d in zip(MIX_SLOTS, mixed_deltas(dm))})
    slots = resident_slots(dm, deltas)
    eng = engines(dm, slots, dict(max_batch_tokens=512, max_running=64, max_waiting=1024, kv_block_size=16,
                                  kv_blocks=2048, max_model_len=512))
    uni = compare(res, "uniform", eng, uniform_variants(), rounds, timed)
    slots.close()
    del eng

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**DEEP_SHAPE, max_position_embeddings=2048),
                                                 dtype=dtype).eval()
    dm = wrap_model(model, max_slots=2, max_rank=8, max_bottleneck=8, max_tokens=512)
    g = torch.Generator().manual_seed(11)
    mods = {}
    for path, layer in dm.layers.items():
        if isinstance(layer, DeltaLinear) and path.rsplit(".", 1)[-1] in DEEP_TARGETS:
            mods[path] = ModuleDelta(lora=LoraTerm(torch.randn(8, layer.in_features, generator=g) / 24,
                                                   torch.randn(layer.out_features, 8, generator=g) * 0.01, 2.0))
    deep_key = DeltaKey("bench", "deep", 1, "deep")
    slots = resident_slots(dm, {deep_key: Delta(mods)})
    eng = engines(dm, slots, dict(max_batch_tokens=512, max_running=8, max_waiting=64, kv_block_size=16,
                                  kv_blocks=64, max_model_len=512))
    prompt = torch.randint(3, DEEP_SHAPE["vocab_size"], (16,), generator=g).tolist()

    def deep(variant: str):
        return lambda tag: [GenerationRequest(f"deep-{tag}-{variant}", "tenant0", prompt,
                                              SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True),
                                              delta=deep_key if variant == "delta" else None)]
    dp = compare(res, "deep", eng, {"base": deep("base"), "delta": deep("delta")}, rounds, timed)
    slots.close()
    captured = eng["on"].runner.graphs.captures
    res.summary(graphs_speedup_base=uni["base"], graphs_speedup_1_delta=uni["lora_1"],
                graphs_speedup_32_deltas=uni["lora_32"], graphs_speedup_mix=uni["mix"],
                graphs_speedup_deep_base=dp["base"], graphs_speedup_deep_1_delta=dp["delta"],
                token_mismatches=uni["mismatches"] + dp["mismatches"], graphs_captured_deep=captured,
                wall_s=time.perf_counter() - t0, device="cuda")


if __name__ == "__main__":
    main()
