"""Engine throughput: continuous batching with mixed deltas against the base model and against PEFT.

Workload 1, "uniform": 32 concurrent requests, 16-token prompts, 32 new tokens each (EOS ignored). Generated
tokens/s through the engine for the base model alone, 1 / 8 / 32 distinct LoRA deltas (rank 16 on all seven
projections, request i uses delta i % k) and a mix of kinds and ranks (LoRA r4/r8/r16/r32, LoRA + bias,
BitFit, (IA)3, bottleneck adapters, base). Variants run round-robin; each result is a ratio to the base run
of the same round. HF ``generate()`` on the bare model and PEFT's mixed batch with 32 adapters run in the same
process as reference points.

Workload 2, "varied": 64 requests arriving over time (exponential gaps, mean 0.08 s), prompts of 16-256 and
outputs of 8-128 tokens (seed 0), 32 distinct deltas. The engine serves them as they arrive; against it, in
the same run, what a user has today: PEFT's mixed-batch ``generate(adapter_names=...)`` over static batches of
32 in arrival order (a batch starts when its last request has arrived and the previous batch is done; it runs
until its longest output), and PEFT swapping one adapter at a time (``set_adapter`` + batch-1 ``generate``).
Throughput = requested output tokens / makespan. ``--quick`` times the first PEFT static batch and a subset of
the swap requests and extrapolates the rest (each point says so in ``extrapolated``).

Workload 3, "deep": the 30-layer shape of a small real model (random weights: hidden 576, intermediate 1536, 30
layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings: SmolLM2-135M's shape), one request (16-token prompt, 64
new tokens), the base model against one LoRA r8 on q/v/o of every layer. At batch 1 the delta's bytes are under
1 MB, so what ``ratio_1_delta_deep`` loses is per-module overhead (90 wrapped modules with a delta, 210 wrapped);
it is the median over paired rounds (5 with ``--quick``, 9 without) of the delta run against the base run beside it.

Clock: on the CPU every duration is this process's CPU time (``time.process_time``, one torch thread), and
arrivals are replayed on a virtual clock that advances by the CPU time of each step (or jumps to the next arrival
when idle). The development machines are 2 cores shared by several engineers' jobs: wall time there moved by 2x
between two runs of the same decode step (0.14 s vs 0.5 s); CPU time does not count the time other processes hold
the core. On CUDA the clock is wall time after a synchronize.

    python benchmarks/bench_engine.py --quick     # < 3 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # must precede any triton import (transformers imports it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import kernels  # noqa: E402
from benchmarks.bench_model import PROJECTIONS, build_model, random_lora_delta  # noqa: E402
from benchmarks.common import Results, step_clock, timed_once  # noqa: E402
from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta  # noqa: E402
from delta_store.records import DeltaKey  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.deltas import DeltaLinear, wrap_model  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.engine.model_runner import ModelRunner  # noqa: E402
from server.deltas.residency import Residency  # noqa: E402
from server.engine.stats import StepStats  # noqa: E402
from server.types import GenerationRequest, SamplingParams  # noqa: E402

NUM_DELTAS = 32
DEEP_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
DEEP_TARGETS = ("q_proj", "v_proj", "o_proj")
MIX_SLOTS = range(NUM_DELTAS, NUM_DELTAS + 8)  # the mixed-kind deltas live after the 32 LoRA ones


def mixed_deltas(dm) -> list[Delta]:
    """Eight deltas of different kinds and ranks for the "mix" variant."""
    out = [random_lora_delta(dm, r, seed=100 + r) for r in (4, 8, 32)]
    g = torch.Generator().manual_seed(7)
    h = dm.spec.hidden_size
    lin = {p: m for p, m in dm.layers.items() if isinstance(m, DeltaLinear)}
    with_bias = random_lora_delta(dm, 16, seed=200)
    bitfit, ia3, adapters = {}, {}, {}
    for path, layer in lin.items():
        leaf = path.rsplit(".", 1)[-1]
        with_bias.modules[path].bias = 0.01 * torch.randn(layer.out_features, generator=g)
        if leaf in ("v_proj", "down_proj"):
            bitfit[path] = ModuleDelta(bias=0.01 * torch.randn(layer.out_features, generator=g))
        if leaf in ("k_proj", "v_proj"):
            ia3[path] = ModuleDelta(out_scale=1 + 0.1 * torch.randn(layer.out_features, generator=g))
        if leaf == "down_proj":
            ia3[path] = ModuleDelta(in_scale=1 + 0.1 * torch.randn(layer.in_features, generator=g))
            adapters[path] = ModuleDelta(adapter=AdapterTerm(
                0.05 * torch.randn(64, h, generator=g), torch.zeros(64), 0.05 * torch.randn(h, 64, generator=g),
                torch.zeros(h), "relu", 1.0, "output"))
    out += [with_bias, Delta(bitfit), Delta(ia3), Delta(adapters)]
    return out  # 7 deltas; the eighth "mix" row is the base model


def key(i: int) -> DeltaKey:
    return DeltaKey("bench", f"d{i}", 1, f"d{i}")


def uniform_requests(variant: str, tag: str) -> list[tuple[float, GenerationRequest]]:
    """Workload 1's 32 requests for ``variant`` (base, lora_<k>, mix), all arriving at once (also bench_graphs')."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(32):
        if variant == "base":
            delta = None
        elif variant == "mix":
            delta = None if i % 8 == 7 else key(MIX_SLOTS[i % 8] if i % 8 < 7 else 0)
            if i % 8 < 3:  # and some rank-16 LoRA rows
                delta = key(i % NUM_DELTAS) if i % 16 < 3 else delta
        else:
            delta = key(i % int(variant.split("_")[1]))
        prompt = torch.randint(3, 32000, (16,), generator=g).tolist()
        out.append((0.0, GenerationRequest(f"{tag}-{variant}-{i}", f"tenant{i % 4}", prompt,
                                           SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True),
                                           delta=delta)))
    return out


def resident_slots(dm, deltas: dict) -> Residency:
    """The residency owner holding every delta of ``deltas`` before timing (these benchmarks measure serving)."""
    budget = 2 * sum(dm.footprint(d) for d in deltas.values())  # every delta fits
    slots = Residency(dm, deltas.__getitem__, budget)
    futures = [slots.request(k, notify=True) for k in deltas]
    while not all(f.done() for f in futures):
        time.sleep(0.001)
        slots.step()
    return slots


def serve_on(engine, steps: list, clock, requests: list[tuple[float, GenerationRequest]]) -> tuple[float, int]:
    """Serve (arrival offset s, request) pairs as they arrive on the virtual clock of ``clock`` (CPU time of each
    step; jumps to the next arrival when idle); returns (makespan s, generated tokens)."""
    pending = sorted(requests, key=lambda x: x[0])
    steps.clear()
    generated, now = 0, 0.0
    while pending or engine.scheduler.has_work():
        while pending and pending[0][0] <= now:
            engine.add_request(pending.pop(0)[1])
        if not engine.scheduler.has_work():
            now = pending[0][0]  # idle until the next arrival
            continue
        outs = []
        now += clock(lambda: outs.extend(engine.step()))
        generated += sum(len(o.token_ids) for o in outs)
    return now, generated


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.set_grad_enabled(False)
        self.bare = build_model(self.device, self.dtype, args.layers)
        self.peft_base = copy.deepcopy(self.bare)
        dm = wrap_model(self.bare, max_slots=64, max_rank=32, max_bottleneck=64, max_tokens=1024,
                        fuse_siblings=args.fuse == "on")
        self.dm = dm
        deltas = {key(i): random_lora_delta(dm, 16, seed=i) for i in range(NUM_DELTAS)}
        deltas.update({key(s): d for s, d in zip(MIX_SLOTS, mixed_deltas(dm))})
        self.slots = resident_slots(dm, deltas)
        self.config = ServerConfig(max_batch_tokens=512, max_running=64, max_waiting=1024, kv_block_size=16,
                                   kv_blocks=2048, max_model_len=512)
        self.engine = Engine(self.config, ModelRunner(dm, None, self.config), self.slots)
        self.steps: list[StepStats] = []
        self.engine.add_listener(lambda s: self.steps.append(s) if isinstance(s, StepStats) else None)
        self.res = Results(__file__, settings=dict(quick=args.quick, layers=args.layers, dtype=str(self.dtype),
                                                   hidden=self.bare.config.hidden_size, rank=16,
                                                   kernels=kernels.current_backend(torch.zeros(1, device=self.device)),
                                                   threads=torch.get_num_threads(), fuse_siblings=args.fuse))
        self._peft = None
        self.clock = step_clock(self.device)
        self.res.settings["clock"] = "wall" if self.device.type == "cuda" else "process_cpu_time"

    def timed(self, fn) -> float:
        return timed_once(fn, self.device, self.clock)

    # ---- the engine --------------------------------------------------------------------------
    def serve(self, requests: list[tuple[float, GenerationRequest]]) -> tuple[float, int]:
        """Serve (arrival offset s, request) pairs as they arrive on the virtual clock; (makespan s, tokens)."""
        return serve_on(self.engine, self.steps, self.timed, requests)

    def uniform(self) -> dict:
        variants = ["base", "lora_1", "lora_8", "lora_32", "mix"]
        rounds = 1 if self.args.quick else 5
        self.serve(uniform_requests("lora_32", "warm"))  # first-call paths, allocator
        samples = {v: [] for v in variants}
        overhead = {v: [] for v in variants}
        for r in range(rounds):
            for v in variants:
                wall, tokens = self.serve(uniform_requests(v, f"r{r}"))
                assert tokens == 32 * 32, tokens
                samples[v].append(tokens / wall)
                fwd, step = sum(s.forward_time for s in self.steps), sum(s.step_time for s in self.steps)
                overhead[v].append(1 - fwd / step)  # wall-clock share of each step spent outside the runner
        tps = {v: statistics.median(s) for v, s in samples.items()}
        for v in variants:
            ratios = [s / b for s, b in zip(samples[v], samples["base"])]
            self.res.write({"workload": "uniform", "variant": v, "tokens_per_s": tps[v],
                            "tokens_per_s_samples": samples[v], "ratio_to_base": statistics.median(ratios),
                            "engine_overhead_fraction": statistics.median(overhead[v])})
            print(f"uniform  {v:8s} {tps[v]:8.1f} tok/s  x{statistics.median(ratios):.3f} of base "
                  f"(time outside the forward: {100 * statistics.median(overhead[v]):.1f}%)", flush=True)
        return {v: statistics.median([s / b for s, b in zip(samples[v], samples["base"])]) for v in variants} | {
            "base_tps": tps["base"]}

    # ---- workload 3: one request on a deep model --------------------------------------------------
    def deep(self) -> dict:
        """One request on the 30-layer shape, base vs one LoRA r8 on q/v/o, round-robin; the median of the rounds'
        paired ratios (the ratio of the medians beside it in the JSON line)."""
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(**DEEP_SHAPE, max_position_embeddings=2048)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype).eval()
        dm = wrap_model(model, max_slots=2, max_rank=8, max_bottleneck=8, max_tokens=512,
                        fuse_siblings=self.args.fuse == "on")
        g = torch.Generator().manual_seed(11)
        mods = {}
        for path, layer in dm.layers.items():
            if isinstance(layer, DeltaLinear) and path.rsplit(".", 1)[-1] in DEEP_TARGETS:
                a = torch.randn(8, layer.in_features, generator=g) / layer.in_features ** 0.5
                b = torch.randn(layer.out_features, 8, generator=g) * 0.01
                mods[path] = ModuleDelta(lora=LoraTerm(a, b, 2.0))
        deep_key = DeltaKey("bench", "deep", 1, "deep")
        slots = resident_slots(dm, {deep_key: Delta(mods)})
        config = ServerConfig(max_batch_tokens=512, max_running=8, max_waiting=64, kv_block_size=16, kv_blocks=64,
                              max_model_len=512)
        engine = Engine(config, ModelRunner(dm, None, config), slots)
        steps: list = []
        new_tokens = 64
        prompt = torch.randint(3, DEEP_SHAPE["vocab_size"], (16,), generator=g).tolist()

        def request(variant: str, tag: str):
            return [(0.0, GenerationRequest(f"deep-{tag}-{variant}", "tenant0", prompt,
                                            SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True),
                                            delta=deep_key if variant == "delta" else None))]

        serve_on(engine, steps, self.timed, request("delta", "warm"))
        serve_on(engine, steps, self.timed, request("base", "warm"))
        # Paired rounds, as workload 1: each round's delta run against the base run beside it, median over the
        # rounds. On 2 shared cores the base step alone moved +-4 ms of ~70 between interleaved runs (6%), the size
        # of what this point measures; five pairs of the 64-token request keep one slow run from deciding it.
        rounds = 5 if self.args.quick else 9
        samples = {"base": [], "delta": []}
        for r in range(rounds):
            for v in (("base", "delta") if r % 2 == 0 else ("delta", "base")):  # neither always runs first
                wall, tokens = serve_on(engine, steps, self.timed, request(v, f"r{r}"))
                assert tokens == new_tokens, tokens
                samples[v].append(tokens / wall)
        slots.close()
        tps = {v: statistics.median(x) for v, x in samples.items()}
        pairs = [d / b for d, b in zip(samples["delta"], samples["base"])]
        ratio = statistics.median(pairs)
        self.res.write({"workload": "deep", "variant": "lora_r8_qvo_vs_base", "shape": DEEP_SHAPE,
                        "tokens_per_s": tps, "tokens_per_s_samples": samples, "ratio_to_base": ratio,
                        "ratio_pairs": pairs, "ratio_of_medians": tps["delta"] / tps["base"],
                        "wrapped_modules": sum(isinstance(m, DeltaLinear) for m in dm.layers.values()),
                        "modules_with_delta": len(mods)})
        print(f"deep     base {tps['base']:7.1f} tok/s, 1 LoRA r8 q/v/o {tps['delta']:7.1f} tok/s  x{ratio:.3f} "
              f"of base ({len(mods)} of {sum(isinstance(m, DeltaLinear) for m in dm.layers.values())} wrapped "
              f"modules carry the delta)", flush=True)
        return {"ratio_1_delta_deep": ratio}

    # ---- HF / PEFT references ----------------------------------------------------------------------
    def peft(self):
        if self._peft is None:
            from peft import LoraConfig, get_peft_model

            cfg = lambda: LoraConfig(r=16, lora_alpha=32, target_modules=list(PROJECTIONS),  # noqa: E731
                                     init_lora_weights=False)
            pm = get_peft_model(self.peft_base, cfg(), adapter_name="a0")
            for i in range(1, NUM_DELTAS):
                pm.add_adapter(f"a{i}", cfg())
            pm.eval()
            pm.base_model.model.generation_config.eos_token_id = None  # run every requested token, as the engine
            self._peft = pm
        return self._peft

    def hf_generate(self, model, prompts: list[list[int]], max_new: int, adapter_names=None) -> float:
        """Left-padded static batch; seconds for generate()."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kw = {} if adapter_names is None else {"adapter_names": adapter_names}
        return self.timed(lambda: model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                                 max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                                 pad_token_id=0, **kw))

    def uniform_references(self, base_tps: float) -> dict:
        prompts = [r.prompt_token_ids for _, r in uniform_requests("base", "ref")]
        with self.peft().disable_adapter():
            hf = 32 * 32 / self.hf_generate(self.peft(), prompts, 32)
        mixed = 32 * 32 / self.hf_generate(self.peft(), prompts, 32, [f"a{i}" for i in range(32)])
        for name, tps in (("hf_generate_base", hf), ("peft_mixed_32", mixed)):
            self.res.write({"workload": "uniform", "variant": name, "tokens_per_s": tps,
                            "ratio_to_engine_base": tps / base_tps})
            print(f"uniform  {name:16s} {tps:8.1f} tok/s  (engine base / this: {base_tps / tps:.2f})", flush=True)
        return {"hf_base_tps": hf, "peft_mixed_tps": mixed}

    # ---- workload 2 ----------------------------------------------------------------------------
    def varied_requests(self) -> list[tuple[float, GenerationRequest]]:
        rng = random.Random(0)
        t, out = 0.0, []
        order = list(range(64))
        for i in order:
            t += rng.expovariate(1 / 0.08)
            n_prompt, n_out = rng.randint(16, 256), rng.randint(8, 128)
            prompt = [rng.randrange(3, 32000) for _ in range(n_prompt)]
            out.append((t, GenerationRequest(f"v{i}", f"tenant{i % 8}", prompt,
                                             SamplingParams(max_new_tokens=n_out, temperature=0, ignore_eos=True),
                                             delta=key(rng.randrange(NUM_DELTAS) if i >= NUM_DELTAS else i))))
        return out

    def varied(self) -> dict:
        reqs = self.varied_requests()
        wanted = sum(r.sampling.max_new_tokens for _, r in reqs)
        wall, tokens = self.serve(reqs)
        assert tokens == wanted, (tokens, wanted)
        engine_tps = tokens / wall
        # PEFT mixed batches of 32 in arrival order
        pm = self.peft()
        clock, timed, batches = 0.0, 0, [reqs[:32], reqs[32:]]
        times = []
        for b, batch in enumerate(batches):
            if self.args.quick and b > 0:
                times.append(times[0])  # extrapolated: same size, similar lengths
            else:
                names = [f"a{int(r.delta.name[1:])}" for _, r in batch]
                times.append(self.hf_generate(pm, [r.prompt_token_ids for _, r in batch],
                                              max(r.sampling.max_new_tokens for _, r in batch), names))
                timed += 1
            clock = max(clock, batch[-1][0]) + times[-1]
        mixed_tps = wanted / clock
        # PEFT swapping: one adapter at a time, batch 1
        subset = reqs[:4] if self.args.quick else reqs
        swap_s = 0.0
        for _, r in subset:
            pm.set_adapter(f"a{int(r.delta.name[1:])}")
            swap_s += self.hf_generate(pm, [r.prompt_token_ids], r.sampling.max_new_tokens)
        sub_tokens = sum(r.sampling.max_new_tokens for _, r in subset)
        swap_compute = swap_s * wanted / sub_tokens  # per generated token, extrapolated in --quick
        swap_tps = wanted / max(swap_compute, reqs[-1][0])
        points = {"engine": (engine_tps, wall, False), "peft_mixed_static32": (mixed_tps, clock, timed < 2),
                  "peft_swap": (swap_tps, swap_compute, len(subset) < len(reqs))}
        for name, (tps, span, extrapolated) in points.items():
            self.res.write({"workload": "varied", "variant": name, "tokens_per_s": tps, "makespan_s": span,
                            "tokens": wanted, "extrapolated": extrapolated, "speedup_of_engine": engine_tps / tps})
            print(f"varied   {name:20s} {tps:8.1f} tok/s  makespan {span:6.1f} s  engine speedup "
                  f"x{engine_tps / tps:.2f}{'  (extrapolated)' if extrapolated else ''}", flush=True)
        return {"speedup_vs_peft_mixed": engine_tps / mixed_tps, "speedup_vs_swap": engine_tps / swap_tps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, PEFT subsets extrapolated: about 3 min on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--skip-varied", action="store_true")
    ap.add_argument("--skip-deep", action="store_true", help="skip workload 3 (the 30-layer model, one request)")
    ap.add_argument("--deep-only", action="store_true", help="run workload 3 alone")
    ap.add_argument("--fuse", choices=("on", "off"), default="on",
                    help="siblings on one input (k/v, gate/up) share one LoRA shrink (wrap_model fuse_siblings)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on the shared 2-core machines a second OpenMP thread spins "
                         "whenever another process holds the other core; setup took 23 s with 2 threads vs 3 s with 1)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bench = Bench(args)
    if args.deep_only:
        deep = bench.deep()
        bench.slots.close()
        bench.res.summary(ratio_1_delta_deep=deep["ratio_1_delta_deep"], wall_s=time.perf_counter() - t0,
                          device=bench.device.type)
        return
    uni = bench.uniform()
    refs = bench.uniform_references(uni["base_tps"])
    var = {} if args.skip_varied else bench.varied()
    deep = {} if args.skip_deep else bench.deep()
    bench.slots.close()
    bench.res.summary(ratio_1_delta_vs_base=uni["lora_1"], ratio_8_deltas_vs_base=uni["lora_8"],
                      ratio_mix_vs_base=uni["mix"], engine_base_vs_hf_generate=uni["base_tps"] / refs["hf_base_tps"],
                      peft_mixed32_vs_hf_base=refs["peft_mixed_tps"] / refs["hf_base_tps"],
                      speedup_vs_swap=var.get("speedup_vs_swap", float("nan")),
                      wall_s=time.perf_counter() - t0, device=bench.device.type,
                      ratio_32_deltas_vs_base=uni["lora_32"],
                      speedup_vs_peft_mixed=var.get("speedup_vs_peft_mixed", float("nan")),
                      ratio_1_delta_deep=deep.get("ratio_1_delta_deep", float("nan")))


if __name__ == "__main__":
    main()
