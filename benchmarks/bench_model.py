"""Forward cost of the delta-aware model against the bare Hugging Face model, in the same run.

Variants, each a point: the bare model; the wrapped model with no delta active; and 1 / 8 / 32
distinct LoRA deltas (rank 16 on all seven projections, DESIGN.md's default) mixed in one batch,
sequence ``i`` using delta ``i % k``. Shapes: prefill (``S`` sequences x ``L`` tokens,
``logits_to_keep=1`` as a server's prefill) and decode (``S`` sequences x 1 token on a KV cache of
``L`` tokens, cropped back after each step so every sample sees the same cache). Model: DESIGN.md's
CPU benchmark model (Llama-shaped, hidden 1024, intermediate 2816, 4 layers, 16 heads, 4 KV heads,
vocab 32000, fp32) or, on CUDA, hidden 4096 / intermediate 11008 in bf16.

Variants are timed round-robin (one sample of each per round, in a shuffled order; median over rounds), because absolute
times on shared machines drift by tens of percent within a minute; ratios to ``bare`` are the result.

    python benchmarks/bench_model.py --quick      # < 1 min on 2 CPU cores
    python benchmarks/bench_model.py --profile    # + where the 32-delta decode step spends its time
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # must precede any triton import (transformers imports it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import kernels  # noqa: E402
from benchmarks.common import Results, time_fn  # noqa: E402
from delta_store.delta import Delta, LoraTerm, ModuleDelta  # noqa: E402
from server.deltas import DeltaLinear, wrap_model  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(device: torch.device, dtype: torch.dtype, layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    big = device.type == "cuda"
    cfg = LlamaConfig(hidden_size=4096 if big else 1024, intermediate_size=11008 if big else 2816,
                      num_hidden_layers=layers, num_attention_heads=32 if big else 16, num_key_value_heads=8 if big else 4,
                      vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: ~1e9 random bf16 weights take ~10 s on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device).eval()


def random_lora_delta(dm, rank: int, seed: int) -> Delta:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for path, layer in dm.layers.items():
        if isinstance(layer, DeltaLinear) and path.rsplit(".", 1)[-1] in PROJECTIONS:
            a = torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5
            b = torch.randn(layer.out_features, rank, generator=g) * 0.01
            mods[path] = ModuleDelta(lora=LoraTerm(a, b, 2.0))
    return Delta(mods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short prefill (32 x 16) and 5 rounds: about a minute on a busy 2-core CPU")
    ap.add_argument("--seqs", type=int, default=32, help="sequences per batch (32 allows 32 distinct deltas)")
    ap.add_argument("--prefill-len", type=int, default=None, help="tokens per sequence in prefill (default 64, quick 16)")
    ap.add_argument("--context", type=int, default=64, help="KV cache length behind each decode token")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=None, help="round-robin samples per variant (default 9, quick 5)")
    ap.add_argument("--profile", action="store_true", help="profile one 32-delta decode step and print the top ops")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU torch threads (default 1: on the shared 2-core machines, 2 threads with other jobs "
                         "running made the bare decode step 4x slower and the ratios swing by 0.5)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    prefill_len = args.prefill_len or (16 if args.quick else 64)
    rounds = args.rounds or (5 if args.quick else 9)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    source = build_model(device, dtype, args.layers)
    # Both sides are deep copies, so their weights are laid out alike in memory (the freshly initialised
    # model's tensors are interleaved with init temporaries, which made it read ~5-15% slower here).
    bare = copy.deepcopy(source)
    dm = wrap_model(copy.deepcopy(source), max_slots=32, max_rank=args.rank, max_bottleneck=8,
                    max_tokens=args.seqs * max(prefill_len, 1))
    del source
    num_deltas = (1, 8, 32)
    for slot in range(max(num_deltas)):
        dm.set_delta(slot, random_lora_delta(dm, args.rank, seed=slot))

    S = args.seqs
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 32000, (S, prefill_len), generator=g).to(device)
    ctx = torch.randint(3, 32000, (S, args.context), generator=g).to(device)
    step_tok = torch.randint(3, 32000, (S, 1), generator=g).to(device)

    def cache_for(model):
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        dm.batch.reset()
        model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    caches = {"bare": cache_for(bare), "wrapped": cache_for(dm.model)}

    def variants(shape: str):
        tokens_per_seq = prefill_len if shape == "prefill" else 1
        out = {"bare": (bare, None), "no_delta": (dm.model, [-1] * S)}
        for k in num_deltas:
            if k <= S:
                out[f"deltas_{k}"] = (dm.model, [i % k for i in range(S)])
        fns = {}
        for name, (model, slots) in out.items():
            cache = caches["bare" if model is bare else "wrapped"]

            def fn(model=model, slots=slots, cache=cache):
                if slots is not None:
                    dm.batch.prepare_sequences(slots, [tokens_per_seq] * S)
                if shape == "prefill":
                    return model(input_ids=prompt, use_cache=False, logits_to_keep=1)
                extra = cache.get_seq_length() - args.context
                if extra > 0:  # drop the previous sample's token: every sample decodes at the same length
                    cache.crop(-extra)
                return model(input_ids=step_tok, past_key_values=cache, use_cache=True)
            fns[name] = fn
        return fns

    res = Results(__file__, settings=dict(quick=args.quick, seqs=S, prefill_len=prefill_len, context=args.context,
                                          layers=args.layers, rank=args.rank, rounds=rounds, dtype=str(dtype),
                                          threads=torch.get_num_threads(),
                                          kernels=kernels.current_backend(prompt), hidden=bare.config.hidden_size))
    ratios = {}
    for shape in ("prefill", "decode"):
        fns = variants(shape)
        for fn in fns.values():  # warm-up: allocator, first-call paths
            fn()
        samples = {name: [] for name in fns}
        order = list(fns)
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)  # no variant always runs first (or right after the heaviest one)
            for name in order:
                samples[name].append(time_fn(fns[name], device=device, warmup=0, repeats=1)["ms"])
        base_ms = statistics.median(samples["bare"])
        for name, ms_list in samples.items():
            ms = statistics.median(ms_list)
            tokens = S * (prefill_len if shape == "prefill" else 1)
            ratios[(shape, name)] = ms / base_ms
            res.write({"shape": shape, "variant": name, "ms": ms, "ms_samples": ms_list, "tokens": tokens,
                       "tokens_per_s": tokens / ms * 1e3, "ratio_to_bare": ms / base_ms})
            print(f"{shape:8s} {name:9s} {ms:9.2f} ms  x{ms / base_ms:.3f}", flush=True)

    if args.profile:
        profile_decode(variants("decode")["deltas_32"])
    res.summary(overhead_no_delta=ratios[("decode", "no_delta")], overhead_1_delta=ratios[("decode", "deltas_1")],
                overhead_8_deltas=ratios[("decode", "deltas_8")], overhead_32_deltas=ratios[("decode", "deltas_32")],
                prefill_overhead_no_delta=ratios[("prefill", "no_delta")],
                prefill_overhead_32_deltas=ratios[("prefill", "deltas_32")], device=device.type,
                kernels=kernels.current_backend(prompt))


def profile_decode(fn) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)


if __name__ == "__main__":
    main()
