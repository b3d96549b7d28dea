"""Delta kernels: what the per-token delta work costs next to the base matmul it rides on.

CPU (the CPU backend, ``kernels/cpu/``, is the CPU serving path): for each point, the base matmul
``F.linear(x, W)`` alone, the CPU backend's op (checked first against the exact float64 reference,
``kernels/reference.py``), and a naive PEFT-style loop over the distinct deltas (boolean mask, gather,
two matmuls, scatter-add; what PEFT's mixed-batch ``adapter_names=`` does). Ratios:
``overhead = delta / base`` and ``speedup_vs_loop = loop / delta``. CUDA: the Triton op against the CPU
backend's torch code run on the same CUDA tensors, with the Triton op's achieved bandwidth against the
device's datasheet peak.

Points: a 64-token batch with 1/8/32/64 distinct deltas (token i uses delta i % k), one decode step
(T=32, 32 distinct deltas) and one prefill (T=2048: 32 sequences x 64 tokens), on a q_proj-shaped
layer; then the decode step on all seven projections of the CPU benchmark Llama (hidden 1024), the
layer-level bound for the engine's target (32 distinct rank-16 deltas <= 25% extra decode time),
a D3 check (half the slots rank 4, half rank 64, vs all rank 64) and the other kinds.

The weights are pages (``kernels.LoraPages``, D13): by default 64 resident deltas' runs packed back to back in
slot order (the layout of the fixed pools before D13, so figures compare across that change); the seven-
projection decode step runs again with the runs in the server's rank-bucket regions with holes (``regions``)
and with 2,000 resident deltas of which the step's 32 are scattered (``scattered2k``): the cost of paging at
scale, where the CPU's strided plan cuts the step's runs into blocks of evenly spaced cells
(``kernels/cpu/strided.py``). Every point of the 64-token batch and the decode step also times each CPU plan
forced (``plan_<name>_ms``); ``decode_native_vs_strided`` = the native plan's time / the strided plan's at
the decode step (the native plan serves decode in fp32 where a C compiler built it, ``kernels/cpu/native.py``).

DoRA (``time_dora``): its delta work is the LoRA op plus ``scale_shift_rows`` on its tokens;
``dora_overhead_vs_lora`` = (LoRA + column scale) / LoRA at the same rank (target <= 1.10), and
``dora_mixed_vs_alone`` = the column scale on a batch of 1 DoRA token among 31 plain-LoRA ones / on that
token alone (1.0 = the other tokens pay nothing; when no DoRA slot is active the layer skips the op).

Siblings on one input (``run_packed``): q/k/v (MHA), k/v (GQA) and gate/up through ``kernels.shrink_lora`` (one
shrink over each slot's stack of the members' A rows, then each member's expand) against one ``add_lora`` per
member, at decode (32 tokens of 32 deltas; 1 of 1) and prefill; ``packed_*`` = packed time / per-member time.

The byte floor (``copy_gbs``, ``decode_floor_ratio``): in the same run, the machine's copy bandwidth is
measured on a large tensor copy (256 MB read + 256 MB written, ``dst.copy_(src)``, bytes counted both ways as
STREAM's "copy" does) on the threads the delta ops run on. For the decode points the delta work cannot take
less than its bytes (every active slot's A and B rows, the x rows read and the y rows read and written; see
``bytes_lora``) read once at that bandwidth: ``floor_ms``; ``floor_ratio`` = achieved delta-op time / floor_ms
(1.0 = on the floor). A point whose bytes fit in the caches can go below 1 (the timing loop reuses its
tensors); the seven-projection decode (~37 MB of A/B per layer) cannot.

    python benchmarks/bench_kernels.py --quick       # < 1 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from benchmarks.byte_floor import bytes_lora, copy_bandwidth, with_floor  # noqa: E402
from benchmarks.common import Results, time_many  # noqa: E402
from benchmarks.packed_points import run_packed  # noqa: E402
from kernels import DeltaKernelMeta, MetaBuffers, cpu  # noqa: E402
from kernels.cpu import looped  # noqa: E402
from kernels.reference import ref_add_lora  # noqa: E402
from tests.kernel_cases import (adapter_pages, bottleneck_pools, lora_pages, lora_pools,  # noqa: E402
                                row_pages, scale_shift_pages)

# (name, in, out): the seven projections of the CPU benchmark Llama (DESIGN.md: hidden 1024,
# intermediate 2816, 16 heads, 4 KV heads -> k/v out 256); on a GPU the 4096/11008 model.
PROJ_CPU = (("q", 1024, 1024), ("k", 1024, 256), ("v", 1024, 256), ("o", 1024, 1024),
            ("gate", 1024, 2816), ("up", 1024, 2816), ("down", 2816, 1024))
TIMING = {"repeats": 9, "min_sample_s": 0.05}  # --quick: 5 repeats of >= 10 ms samples
PROJ_GPU = (("q", 4096, 4096), ("k", 4096, 1024), ("v", 4096, 1024), ("o", 4096, 4096),
            ("gate", 4096, 11008), ("up", 4096, 11008), ("down", 11008, 4096))


def loop_over_deltas(y, x, lora_a, lora_b, slots_long, active_host, ranks_host, scales_host):
    """The naive baseline: one mask/gather/matmul/scatter per distinct delta (PEFT mixed batch), on each
    delta's own dense A [r, in] and B [out, r] (``lora_a[s]``, ``lora_b[s]``)."""
    for s in active_host:
        rows = torch.nonzero(slots_long == s).flatten()
        h = x.index_select(0, rows) @ lora_a[s].T
        y.index_add_(0, rows, (h @ lora_b[s].T) * scales_host[s])


class Point:
    """One layer shape and slot map with its pools, ready to time the base, the delta and the loop."""

    def __init__(self, n_in, n_out, slots, ranks, *, dtype, device, max_rank=64, num_slots=64, seed=0,
                 layout="packed"):
        self.slots = slots
        self.pools = lora_pools(num_slots, n_in, n_out, ranks, max_rank=max_rank, dtype=dtype, device=device,
                                seed=seed)  # dense, for the exact reference and the loop
        self.pages = lora_pages(self.pools, layout=layout, seed=seed)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(len(slots), n_in, generator=g).to(device, dtype)  # [T, in]
        self.w = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(device, dtype)  # [out, in]
        self.y = F.linear(self.x, self.w)  # [T, out]
        self.meta = DeltaKernelMeta.build(torch.tensor(slots, dtype=torch.int32, device=device), slots)
        self.slots_long = self.meta.token_slots.long()
        self.ranks_host, self.scales_host = self.pools["rank"].tolist(), self.pools["scale"].tolist()
        self.dense = (self.pools["lora_a"], self.pools["lora_b"], self.pools["scale"], self.pools["rank"])
        used = sorted(set(slots) - {-1})
        self.own = ({s: self.pools["lora_a"][s, :self.ranks_host[s]].contiguous() for s in used},
                    {s: self.pools["lora_b"][s, :, :self.ranks_host[s]].contiguous() for s in used})
        self.device = device

    def base(self):
        return F.linear(self.x, self.w, out=self.y)

    def delta(self, op):
        return lambda: op(self.y, self.x, self.pages, self.meta)

    def loop(self):
        loop_over_deltas(self.y, self.x, *self.own, self.slots_long, self.meta.active_slots_host, self.ranks_host,
                         self.scales_host)

    def check(self, op) -> float:
        """Max |op - exact reference| on a fresh y (CPU fp32 runs only; the timings reuse y)."""
        y = torch.randn_like(self.y)
        want = ref_add_lora(y, self.x, *self.dense, self.slots)
        op(y, self.x, self.pages, self.meta)
        return (y.double().cpu() - want).abs().max().item()


def forced(plan):
    """The CPU backend's LoRA op with its execution plan fixed (to check RUN_MIN_TOKENS against data)."""
    def op(*args):
        with cpu.force_plan(plan):
            cpu.cpu_add_lora(*args)
    return op


PLAN_OPS = {f"plan_{p}": forced(p) for p in cpu.PLANS}


def time_point(res, name, pt, *, ops, flops_rank, extra=None, loop=True) -> dict:
    dev = pt.device
    rank_groups = {max(8, 1 << (pt.ranks_host[s] - 1).bit_length()) for s in pt.meta.active_slots_host}
    row = {"point": name, "tokens": len(pt.slots), "distinct": pt.meta.num_active,
           "in": pt.x.shape[1], "out": pt.y.shape[1], "dtype": str(pt.x.dtype).replace("torch.", ""),
           "rank": flops_rank, "plan": cpu.choose_plan(pt.meta, padded_ok=len(rank_groups) == 1,
                                                       native_ok=lambda: looped.usable(pt.x, pt.y)),
           **(extra or {})}
    fns = {"base": pt.base, **{op_name: pt.delta(op) for op_name, op in ops.items()}}
    if loop:
        fns["loop"] = pt.loop
    times = time_many(fns, device=dev, **TIMING)
    row["base_ms"] = times["base"]["ms"]
    for name in fns:
        if name != "base":
            row[f"{name}_ms"] = times[name]["ms"]
            row[f"{name}_overhead"] = row[f"{name}_ms"] / row["base_ms"]
    res.write(row)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def run_cpu(res, quick: bool) -> dict:
    dt, dev = torch.float32, "cpu"
    ops = {"cpu": cpu.cpu_add_lora}
    rows = {"copy_gbs": copy_bandwidth(res, dev, TIMING)}
    n = 1024
    for k in (1, 8, 32, 64):  # 64-token batch, token i -> delta i % k
        pt = Point(n, n, [i % k for i in range(64)], [16] * 64, dtype=dt, device=dev)
        assert pt.check(cpu.cpu_add_lora) < 1e-3
        rows[f"t64_k{k}"] = time_point(res, f"t64_k{k}", pt, ops={**ops, **PLAN_OPS}, flops_rank=16)
    pt = Point(n, n, list(range(32)), [16] * 64, dtype=dt, device=dev)
    rows["decode"] = with_floor(res, time_point(res, "decode_t32_k32", pt, ops={**ops, **PLAN_OPS}, flops_rank=16),
                                pt, "cpu", rows["copy_gbs"])
    if not quick:  # the rest of the grid: decode with fewer deltas, prefill with fewer or more
        for k in (1, 8):
            pt = Point(n, n, [i % k for i in range(32)], [16] * 64, dtype=dt, device=dev)
            time_point(res, f"decode_t32_k{k}", pt, ops=ops, flops_rank=16)
        for k in (1, 8, 64):  # 2048 tokens in max(32, k) sequences, sequence j on delta j % k
            seqs = max(32, k)
            pt = Point(n, n, [j % k for j in range(seqs) for _ in range(2048 // seqs)], [16] * 64, dtype=dt,
                       device=dev)
            time_point(res, f"prefill_t2048_k{k}", pt, ops=ops, flops_rank=16)
    pt = Point(n, n, [j for j in range(32) for _ in range(64)], [16] * 64, dtype=dt, device=dev)
    rows["prefill"] = time_point(res, "prefill_t2048_k32", pt, ops=ops, flops_rank=16)

    # D3: a batch mixing rank 4 and rank 64 against one where every slot is rank 64
    mixed = Point(n, n, list(range(32)), [4, 64] * 32, dtype=dt, device=dev)
    full = Point(n, n, list(range(32)), [64] * 64, dtype=dt, device=dev)
    r_mixed = time_point(res, "decode_rank_4_64", mixed, ops=ops, flops_rank="4/64", loop=False)
    r_full = time_point(res, "decode_rank_64", full, ops=ops, flops_rank=64, loop=False)
    rows["rank_mix_vs_64"] = r_mixed["cpu_ms"] / r_full["cpu_ms"]

    # decode step on all seven projections: the engine's layer-level budget, with the runs packed (the
    # pre-D13 pool order), in rank-bucket regions with holes, and 32 active among 2,000 resident deltas
    many = 1000 if quick else 2000  # resident deltas of the last variant (--quick: less memory to fill)
    for tag, layout, num_slots, active in (("", "packed", 64, list(range(32))),
                                           ("_regions", "regions", 64, list(range(32))),
                                           ("_scattered2k", "scattered", many, list(range(3, many, many // 32))[:32])):
        base = delta = floor = 0.0
        for proj, n_in, n_out in PROJ_CPU:
            pt = Point(n_in, n_out, active, [16] * num_slots, dtype=dt, device=dev, seed=n_out, layout=layout,
                       num_slots=num_slots, max_rank=16)
            r = time_point(res, f"decode7{tag}_{proj}", pt, ops=ops, flops_rank=16, loop=False,
                           extra={"layout": layout, "resident": num_slots})
            base, delta = base + r["base_ms"], delta + r["cpu_ms"]
            floor += bytes_lora(pt) / (rows["copy_gbs"] * 1e9) * 1e3
        rows[f"decode7{tag}_overhead"] = delta / base
        rows[f"decode7{tag}_floor_ratio"] = delta / floor
        res.write({"point": f"decode7{tag}_total", "base_ms": base, "cpu_ms": delta, "cpu_overhead": delta / base,
                   "floor_ms": floor, "floor_ratio": delta / floor, "copy_gbs": rows["copy_gbs"]})
        print(f"  decode7{tag}: delta work {delta:.3f} ms, floor {floor:.3f} ms = x{delta / floor:.2f}; base "
              f"{base:.3f} ms", flush=True)

    rows["packed"] = run_packed(res, n, 2816, 256, dt, dev, TIMING)

    # other kinds, decode and prefill, on the q_proj shape
    for label, slots in (("decode", list(range(32))), ("prefill", [j for j in range(32) for _ in range(64)])):
        rows[f"kinds_{label}"] = time_kinds(res, label, slots, n, dt, dev)
        rows[f"dora_{label}"] = time_dora(res, label, slots, n, dt, dev,
                                          lora=cpu.cpu_add_lora, scale_shift=cpu.cpu_scale_shift_rows)
    return rows


def time_dora(res, label, slots, hidden, dt, dev, *, lora, scale_shift) -> dict:
    """DoRA's delta work against plain LoRA's at rank 16, and the column scale in a mixed batch."""
    pt = Point(hidden, hidden, slots, [16] * 64, dtype=dt, device=dev, seed=5)
    g = torch.Generator().manual_seed(6)
    scale = (1 + 0.1 * torch.randn(64, hidden, generator=g)).to(dev)  # fp32 [S, out]
    shift = (0.01 * torch.randn(64, hidden, generator=g)).to(dev)
    all_on = torch.ones(64, dtype=torch.int32, device=dev)
    one_on = torch.zeros(64, dtype=torch.int32, device=dev)
    one_on[slots[0]] = 1
    on_all = scale_shift_pages(scale, shift, all_on, layout="regions", seed=5)  # the server's fp32 arena layout
    on_one = scale_shift_pages(scale, shift, one_on, layout="regions", seed=5)
    first = [i for i, s in enumerate(slots) if s == slots[0]]  # the DoRA slot's tokens, alone in a batch
    alone_meta = DeltaKernelMeta.build(torch.tensor([slots[0]] * len(first), dtype=torch.int32, device=dev))
    y_alone = pt.y[:len(first)].clone()

    def dora():
        lora(pt.y, pt.x, pt.pages, pt.meta)
        scale_shift(pt.y, on_all, pt.meta)

    times = time_many({
        "lora": pt.delta(lora), "dora": dora,
        "rows_mixed": lambda: scale_shift(pt.y, on_one, pt.meta),
        "rows_alone": lambda: scale_shift(y_alone, on_one, alone_meta)}, device=dev, **TIMING)
    out = {"dora_overhead_vs_lora": times["dora"]["ms"] / times["lora"]["ms"],
           "dora_mixed_vs_alone": times["rows_mixed"]["ms"] / times["rows_alone"]["ms"]}
    row = {"point": f"dora_{label}", "tokens": len(slots), "hidden": hidden, "rank": 16,
           **{f"{k}_ms": v["ms"] for k, v in times.items()}, **out}
    res.write(row)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return out


def time_kinds(res, label, slots, hidden, dt, dev) -> dict:
    g = torch.Generator().manual_seed(3)
    meta = DeltaKernelMeta.build(torch.tensor(slots, dtype=torch.int32, device=dev), slots)
    x = torch.randn(len(slots), hidden, generator=g).to(dev, dt)
    w = (torch.randn(hidden, hidden, generator=g) / hidden ** 0.5).to(dev, dt)
    y = F.linear(x, w)
    bp = adapter_pages(bottleneck_pools(64, hidden, [16] * 64, [kernels.ACT_CODES["gelu"]] * 64, max_width=64,
                                        dtype=dt, device=dev), layout="packed")
    vec = row_pages((1 + torch.rand(64, hidden, generator=g)).to(dev, dt), layout="packed")
    u = y.clone()
    buffers = MetaBuffers(len(slots), 64, dev)  # the serving path: index tensors refilled in place
    times = time_many({
        "base": lambda: F.linear(x, w, out=y),
        "bottleneck": lambda: cpu.cpu_add_bottleneck(y, u, bp, meta),
        "bitfit": lambda: cpu.cpu_add_bias(y, vec, meta),
        "ia3": lambda: cpu.cpu_mul_rows(y, vec, meta),
        "meta_build": lambda: DeltaKernelMeta.build(meta.token_slots, slots),
        "meta_build_buffers": lambda: DeltaKernelMeta.build(meta.token_slots, slots, buffers=buffers)},
        device=dev, **TIMING)
    base = times["base"]["ms"]
    out = {k: v["ms"] / base for k, v in times.items() if k != "base"}
    row = {"point": f"kinds_{label}", "tokens": len(slots), "hidden": hidden, "base_ms": base,
           **{f"{k}_overhead": v for k, v in out.items()}}
    res.write(row)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return out


def run_cuda(res, quick: bool) -> dict:
    from benchmarks.common import peak_bandwidth_gbs
    from kernels.lora import triton_add_lora

    dt, dev = torch.bfloat16, "cuda"
    ops = {"triton": triton_add_lora, "cpu": cpu.cpu_add_lora}
    peak = peak_bandwidth_gbs()
    rows = {"copy_gbs": copy_bandwidth(res, dev, TIMING)}
    n = 4096
    points = [(f"t64_k{k}", [i % k for i in range(64)]) for k in (1, 8, 32, 64)]
    points += [("decode_t32_k32", list(range(32))), ("decode_t256_k64", [i % 64 for i in range(256)]),
               ("prefill_t2048_k32", [j for j in range(32) for _ in range(64)])]
    if not quick:
        points += [("prefill_t8192_k64", [j for j in range(64) for _ in range(128)])]
    for name, slots in points:
        pt = Point(n, n, slots, [16] * 64, dtype=dt, device=dev)
        r = time_point(res, name, pt, ops=ops, flops_rank=16,
                       extra={"bytes": bytes_lora(pt)})
        gbs = r["bytes"] / (r["triton_ms"] * 1e-3) / 1e9
        r["triton_gbs"], r["triton_peak_frac"] = gbs, (gbs / peak if peak else None)
        if name.startswith("decode"):
            with_floor(res, r, pt, "triton", rows["copy_gbs"])
        res.write({"point": f"{name}_bandwidth", "triton_gbs": gbs, "peak_gbs": peak,
                   "triton_peak_frac": r["triton_peak_frac"]})
        print(f"  {name}: triton {gbs:.0f} GB/s = {r['triton_peak_frac'] or 0:.2%} of peak {peak}", flush=True)
        rows[name] = r
    mixed = Point(n, n, list(range(32)), [4, 64] * 32, dtype=dt, device=dev)
    full = Point(n, n, list(range(32)), [64] * 64, dtype=dt, device=dev)
    rm = time_point(res, "decode_rank_4_64", mixed, ops=ops, flops_rank="4/64", loop=False)
    rf = time_point(res, "decode_rank_64", full, ops=ops, flops_rank=64, loop=False)
    rows["rank_mix_vs_64"] = rm["triton_ms"] / rf["triton_ms"]
    base = delta = 0.0
    for proj, n_in, n_out in PROJ_GPU:
        pt = Point(n_in, n_out, list(range(32)), [16] * 64, dtype=dt, device=dev, seed=n_out)
        r = time_point(res, f"decode7_{proj}", pt, ops=ops, flops_rank=16, loop=False)
        base, delta = base + r["base_ms"], delta + r["triton_ms"]
    rows["decode7_overhead"] = delta / base
    rows["packed"] = run_packed(res, n, 11008, 1024, dt, dev, TIMING)
    from kernels.scale_shift import triton_scale_shift_rows
    for label, slots in (("decode", list(range(32))), ("prefill", [j for j in range(32) for _ in range(64)])):
        rows[f"dora_{label}"] = time_dora(res, label, slots, n, dt, dev, lora=triton_add_lora,
                                          scale_shift=triton_scale_shift_rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU run of under a minute")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default). 1 by default: with 2 OpenMP threads on 2 shared "
                         "cores a neighbour's load swung single samples by 2-50x here")
    ap.add_argument("--clock", default="thread", choices=("thread", "wall"),
                    help="CPU timing clock: this thread's CPU time (robust to neighbours' load) or wall time")
    args = ap.parse_args()
    if args.quick:
        TIMING.update(repeats=5, min_sample_s=0.01)
    TIMING["clock"] = args.clock if args.threads == 1 else "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    res = Results(__file__, {"quick": args.quick, "device": "cuda" if cuda else "cpu", "threads": args.threads,
                             "clock": "cuda_events" if cuda else TIMING["clock"],
                             "backend_env": os.environ.get("DELTASERVE_KERNELS", "auto")})
    if cuda:
        rows = run_cuda(res, args.quick)
        t64 = rows["t64_k32"]
        res.summary(device="cuda", delta_overhead_vs_base=t64["triton_overhead"],
                    speedup_vs_loop=t64["loop_ms"] / t64["triton_ms"],
                    triton_vs_cpu_backend=t64["cpu_ms"] / t64["triton_ms"],
                    decode_overhead=rows["decode_t32_k32"]["triton_overhead"],
                    decode7_overhead=rows["decode7_overhead"],
                    prefill_overhead=rows["prefill_t2048_k32"]["triton_overhead"],
                    decode_peak_bw_frac=rows["decode_t32_k32"]["triton_peak_frac"],
                    copy_gbs=rows["copy_gbs"], decode_floor_ratio=rows["decode_t32_k32"]["floor_ratio"],
                    prefill_peak_bw_frac=rows["prefill_t2048_k32"]["triton_peak_frac"],
                    rank_mix_vs_64=rows["rank_mix_vs_64"],
                    packed_qkv_decode=rows["packed"]["qkv_decode_t32_k32"]["packed_vs_per_member"],
                    packed_gateup_decode=rows["packed"]["gateup_decode_t32_k32"]["packed_vs_per_member"],
                    packed_qkv_decode_t1=rows["packed"]["qkv_decode_t1_k1"]["packed_vs_per_member"],
                    packed_qkv_prefill=rows["packed"]["qkv_prefill_t2048_k32"]["packed_vs_per_member"],
                    dora_overhead_vs_lora=rows["dora_decode"]["dora_overhead_vs_lora"],
                    dora_overhead_vs_lora_prefill=rows["dora_prefill"]["dora_overhead_vs_lora"],
                    dora_mixed_vs_alone=rows["dora_decode"]["dora_mixed_vs_alone"])
    else:
        rows = run_cpu(res, args.quick)
        t64 = rows["t64_k32"]
        res.summary(device="cpu", delta_overhead_vs_base=t64["cpu_overhead"],
                    speedup_vs_loop=t64["loop_ms"] / t64["cpu_ms"],
                    **{f"overhead_t64_k{k}": rows[f"t64_k{k}"]["cpu_overhead"] for k in (1, 8, 64)},
                    decode_overhead=rows["decode"]["cpu_overhead"],
                    decode_speedup_vs_loop=rows["decode"]["loop_ms"] / rows["decode"]["cpu_ms"],
                    decode_plan=rows["decode"]["plan"],
                    decode_native_vs_strided=rows["decode"]["plan_native_ms"] / rows["decode"]["plan_strided_ms"],
                    decode7_overhead=rows["decode7_overhead"], decode7_regions_overhead=rows["decode7_regions_overhead"],
                    decode7_scattered2k_overhead=rows["decode7_scattered2k_overhead"],
                    copy_gbs=rows["copy_gbs"], decode_floor_ratio=rows["decode"]["floor_ratio"],
                    decode7_floor_ratio=rows["decode7_regions_floor_ratio"],
                    prefill_overhead=rows["prefill"]["cpu_overhead"],
                    prefill_speedup_vs_loop=rows["prefill"]["loop_ms"] / rows["prefill"]["cpu_ms"],
                    rank_mix_vs_64=rows["rank_mix_vs_64"],
                    packed_qkv_decode=rows["packed"]["qkv_decode_t32_k32"]["packed_vs_per_member"],
                    packed_gateup_decode=rows["packed"]["gateup_decode_t32_k32"]["packed_vs_per_member"],
                    packed_qkv_decode_t1=rows["packed"]["qkv_decode_t1_k1"]["packed_vs_per_member"],
                    packed_qkv_prefill=rows["packed"]["qkv_prefill_t2048_k32"]["packed_vs_per_member"],
                    bottleneck_decode=rows["kinds_decode"]["bottleneck"],
                    bitfit_decode=rows["kinds_decode"]["bitfit"], ia3_decode=rows["kinds_decode"]["ia3"],
                    dora_overhead_vs_lora=rows["dora_decode"]["dora_overhead_vs_lora"],
                    dora_overhead_vs_lora_prefill=rows["dora_prefill"]["dora_overhead_vs_lora"],
                    dora_mixed_vs_alone=rows["dora_decode"]["dora_mixed_vs_alone"])


if __name__ == "__main__":
    main()
