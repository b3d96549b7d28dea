"""Shared KV prefixes (D14): prompt/prefix-tuned deltas against the base model, and automatic prefix caching.

(a) "prompt deltas": 64 requests (48 with --quick) arriving over time (exponential gaps, mean 0.05 s; prompts of
32-160 tokens, 32 new tokens each (16 with --quick), seed 0), served by the base model alone and with 32 distinct
deltas (request i uses delta i % 32) that each
put 20 virtual tokens in front of every request: 16 prompt-tuning deltas (virtual input embeddings, run
through the model once per delta) and 16 prefix-tuning deltas (per-layer K/V). Same arrivals; throughput =
generated tokens / makespan; ``ratio_prompt_deltas_vs_base`` is the median over rounds of the deltas run over
the base run of the same round (target >= 0.90; rounds alternate which variant goes first: 2 with --quick, 4
without). Every delta is resident and its prefix computed, and both variants warmed up, before timing (this
measures serving, as bench_engine does; an unwarmed first base round ran 1.5x slower here).

(b) "system prompt": 64 requests over 8 LoRA deltas (rank 16 on all seven projections, request i uses delta
i % 8) that share a 512-token system prompt and differ in a 32-token user turn, 2 new tokens each (TTFT is
the measure; decode steps would only add time); arrivals every ``1.5 x`` the measured time of one uncached
request (so the uncached server runs at about two-thirds load, not saturated). Served with prefix caching on and off: ``ttft_speedup_cached`` = median
time to first token off / on (target >= 4); ``prefill_tokens_saved`` = prompt tokens the cached run did not
compute (the off run's prefill tokens minus the on run's: every delta still computes the system prompt once,
because KV is keyed by the delta's content digest).

Clock (as bench_engine): on the CPU each duration is this process's CPU time with one torch thread, and
arrivals are replayed on a virtual clock that advances by the CPU time of each step (or jumps to the next
arrival when idle), because wall time on the shared 2-core machines moves by 2x between runs. On CUDA: wall
time after a synchronize.

    python benchmarks/bench_prefix.py --quick      # < 4 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
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
from benchmarks.bench_model import build_model, random_lora_delta  # noqa: E402
from benchmarks.common import Results, step_clock, timed_once  # noqa: E402
from delta_store.delta import Delta  # noqa: E402
from delta_store.prompt import PromptPart  # noqa: E402
from delta_store.records import DeltaKey  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.deltas import wrap_model  # noqa: E402
from server.deltas.residency import Residency  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.engine.model_runner import ModelRunner  # noqa: E402
from server.engine.stats import StepStats  # noqa: E402
from server.types import GenerationRequest, SamplingParams  # noqa: E402

NUM_PROMPT_DELTAS = 32
VIRTUAL_TOKENS = 20
NUM_LORA = 8
SYSTEM_TOKENS, USER_TOKENS = 512, 32


def prompt_deltas(spec, n: int, virtual: int) -> list[Delta]:
    """Half prompt tuning (embeddings, std of the model's own embeddings), half prefix tuning (K/V)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        if i % 2 == 0:
            part = PromptPart(embeddings=0.02 * torch.randn(virtual, spec.hidden_size, generator=g))
        else:
            shape = (spec.num_layers, virtual, spec.num_kv_heads, spec.head_dim)
            part = PromptPart(keys=torch.randn(shape, generator=g), values=torch.randn(shape, generator=g),
                              positions="from_zero" if i % 4 == 1 else "after_prefix")
        out.append(Delta({}, "native", spec.fingerprint, f"prompt delta {i}", prompt=part))
    return out


def key(i: int) -> DeltaKey:
    return DeltaKey("bench", f"d{i}", 1, f"bench-digest-{i}")


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.set_grad_enabled(False)
        model = build_model(self.device, self.dtype, args.layers)
        self.dm = wrap_model(model, max_slots=NUM_PROMPT_DELTAS + NUM_LORA, max_rank=16, max_tokens=1024)
        spec = self.dm.spec
        self.deltas = {key(i): d for i, d in enumerate(prompt_deltas(spec, NUM_PROMPT_DELTAS, VIRTUAL_TOKENS))}
        self.deltas.update({key(NUM_PROMPT_DELTAS + i): random_lora_delta(self.dm, 16, seed=i) for i in range(NUM_LORA)})
        budget = 2 * sum(self.dm.footprint(d) for d in self.deltas.values()) + (1 << 20)  # all of them, with room
        self.slots = Residency(self.dm, self.deltas.__getitem__, budget)
        futures = [self.slots.request(k, notify=True) for k in self.deltas]  # every delta resident before timing
        while not all(f.done() for f in futures):
            time.sleep(0.001)
            self.slots.step()
        for f in futures:
            f.result()
        self.clock = step_clock(self.device)
        self.res = Results(__file__, settings=dict(
            quick=args.quick, layers=args.layers, dtype=str(self.dtype), hidden=spec.hidden_size,
            virtual_tokens=VIRTUAL_TOKENS, kernels=kernels.current_backend(torch.zeros(1, device=self.device)),
            threads=torch.get_num_threads(), clock="wall" if self.device.type == "cuda" else "process_cpu_time"))

    def engine(self, *, caching: bool) -> tuple[Engine, list[StepStats]]:
        config = ServerConfig(max_batch_tokens=512, max_running=64, max_waiting=1024, kv_block_size=16,
                              kv_blocks=2048, max_model_len=1024, prefix_caching=caching)
        engine = Engine(config, ModelRunner(self.dm, None, config), self.slots)
        steps: list[StepStats] = []
        engine.add_listener(lambda s: steps.append(s) if isinstance(s, StepStats) else None)
        return engine, steps

    def timed(self, fn) -> float:
        return timed_once(fn, self.device, self.clock)

    def serve(self, engine: Engine, requests: list[tuple[float, GenerationRequest]]) -> dict:
        """Serve (arrival s, request) pairs on the virtual clock: makespan, tokens, TTFT per request."""
        pending = sorted(requests, key=lambda x: x[0])
        arrival = {r.request_id: t for t, r in pending}
        first: dict[str, float] = {}
        generated, now = 0, 0.0
        while pending or engine.scheduler.has_work():
            while pending and pending[0][0] <= now:
                engine.add_request(pending.pop(0)[1])
            if not engine.scheduler.has_work():
                now = max(now, pending[0][0])  # idle until the next arrival
                continue
            outs = []
            now += self.timed(lambda: outs.extend(engine.step()))
            for o in outs:
                if o.token_ids:
                    generated += len(o.token_ids)
                    first.setdefault(o.request_id, now)
        return {"makespan": now, "tokens": generated, "ttft": [first[r] - arrival[r] for r in arrival]}

    # ---- (a) ----------------------------------------------------------------------------------
    def arrivals(self, tag: str, with_deltas: bool) -> list[tuple[float, GenerationRequest]]:
        rng = random.Random(0)
        t, out = 0.0, []
        for i in range(self.num_requests):
            t += rng.expovariate(1 / 0.05)
            prompt = [rng.randrange(3, 32000) for _ in range(rng.randint(32, 160))]
            out.append((t, GenerationRequest(f"{tag}-{i}", f"tenant{i % 4}", prompt,
                                             SamplingParams(max_new_tokens=self.new_tokens, temperature=0,
                                                            ignore_eos=True),
                                             delta=key(i % NUM_PROMPT_DELTAS) if with_deltas else None)))
        return out

    @property
    def new_tokens(self) -> int:
        return 16 if self.args.quick else 32

    @property
    def num_requests(self) -> int:
        return 48 if self.args.quick else 64

    def prompt_deltas_vs_base(self) -> float:
        engine, steps = self.engine(caching=True)
        for variant in ("deltas", "base"):  # first-call paths of both; every delta's prefix computed here
            self.serve(engine, self.arrivals(f"warm-{variant}", variant == "deltas"))
        computed = engine.prefix.stats.prompt_computes
        rounds = 2 if self.args.quick else 4
        ratios, tps = [], {"base": [], "deltas": []}
        for r in range(rounds):
            for variant in ("base", "deltas") if r % 2 == 0 else ("deltas", "base"):
                out = self.serve(engine, self.arrivals(f"r{r}-{variant}", variant == "deltas"))
                assert out["tokens"] == self.num_requests * self.new_tokens, out["tokens"]
                tps[variant].append(out["tokens"] / out["makespan"])
            ratios.append(tps["deltas"][-1] / tps["base"][-1])
        assert engine.prefix.stats.prompt_computes == computed, "a resident delta's prefix was computed again"
        ratio = statistics.median(ratios)
        self.res.write({"workload": "prompt_deltas", "num_deltas": NUM_PROMPT_DELTAS, "virtual_tokens": VIRTUAL_TOKENS,
                        "requests": self.num_requests, "new_tokens": self.new_tokens,
                        "tokens_per_s_base": statistics.median(tps["base"]),
                        "tokens_per_s_deltas": statistics.median(tps["deltas"]), "ratio_to_base": ratio,
                        "ratio_samples": ratios, "prefixes_computed": computed})
        print(f"prompt deltas  base {statistics.median(tps['base']):7.1f} tok/s  32 prompt/prefix deltas "
              f"{statistics.median(tps['deltas']):7.1f} tok/s  x{ratio:.3f}", flush=True)
        return ratio

    # ---- (b) ----------------------------------------------------------------------------------
    def system_prompt_requests(self, tag: str, gap: float) -> list[tuple[float, GenerationRequest]]:
        rng = random.Random(1)
        system = [rng.randrange(3, 32000) for _ in range(SYSTEM_TOKENS)]
        out = []
        for i in range(64):
            user = [rng.randrange(3, 32000) for _ in range(USER_TOKENS)]
            out.append((i * gap, GenerationRequest(f"{tag}-{i}", f"tenant{i % 8}", system + user,
                                                   SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True),
                                                   delta=key(NUM_PROMPT_DELTAS + i % NUM_LORA))))
        return out

    def system_prompt(self) -> tuple[float, int]:
        engine, _ = self.engine(caching=False)
        probe = self.system_prompt_requests("probe", 0.0)[:2]
        self.serve(engine, probe[:1])  # warm-up
        one = self.serve(engine, probe[1:])["makespan"]  # one uncached 544-token prefill + 1 decode step
        gap = 1.5 * one
        results = {}
        for caching in (False, True):
            engine, steps = self.engine(caching=caching)
            out = self.serve(engine, self.system_prompt_requests(f"sys-{caching}", gap))
            prefill = sum(s.prefill_tokens for s in steps)
            results[caching] = (out, prefill, engine.prefix.stats)
            self.res.write({"workload": "system_prompt", "prefix_caching": caching, "gap_s": gap,
                            "ttft_median_s": statistics.median(out["ttft"]), "ttft_mean_s": statistics.mean(out["ttft"]),
                            "makespan_s": out["makespan"], "prefill_tokens": prefill,
                            "cache_hit_blocks": engine.prefix.stats.hits, "cache_lookups": engine.prefix.stats.lookups})
            print(f"system prompt  caching {'on ' if caching else 'off'}  TTFT median "
                  f"{statistics.median(out['ttft']) * 1e3:8.1f} ms  mean {statistics.mean(out['ttft']) * 1e3:8.1f} ms  "
                  f"prefill tokens {prefill}", flush=True)
        speedup = statistics.median(results[False][0]["ttft"]) / statistics.median(results[True][0]["ttft"])
        saved = results[False][1] - results[True][1]
        assert saved == results[True][2].hits * 16, (saved, results[True][2].hits)
        return speedup, saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="(a): 2 rounds of 48 requests, 16 new tokens; under 4 min "
                    "on 2 CPU cores")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see bench_engine --threads)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bench = Bench(args)
    ratio = bench.prompt_deltas_vs_base()
    speedup, saved = bench.system_prompt()
    bench.slots.close()
    bench.res.summary(ratio_prompt_deltas_vs_base=ratio, ttft_speedup_cached=speedup, prefill_tokens_saved=saved,
                      wall_s=time.perf_counter() - t0, device=bench.device.type)


if __name__ == "__main__":
    main()
