"""``bench_kernels.py``'s sibling points: projections on one input (q/k/v, k/v, gate/up) sharing one LoRA shrink
(``kernels.shrink_lora``) against one ``add_lora`` each, timed with the script's ``timing``."""
from __future__ import annotations

import torch

import kernels
from benchmarks.common import time_many
from kernels import DeltaKernelMeta
from tests.kernel_cases import lora_pools, packed_lora_pages


def time_packed(res, label: str, slots: list[int], n_in: int, outs: tuple[int, ...], dt, dev,
                timing: dict) -> dict:
    """Siblings on one input (``kernels.shrink_lora``: one shrink over each slot's stack, then each member's
    expand) against one ``add_lora`` per member, rank 16 each, stacks in rank-bucket regions; public ops, so
    the backend is the device's."""
    pools = [lora_pools(64, n_in, n_out, [16] * 64, max_rank=16, dtype=dt, device=dev, seed=m)
             for m, n_out in enumerate(outs)]
    pages, _ = packed_lora_pages(pools, layout="regions")
    meta = DeltaKernelMeta.build(torch.tensor(slots, dtype=torch.int32, device=dev), slots)
    x = torch.randn(len(slots), n_in, device=dev).to(dt)
    ys = [torch.zeros(len(slots), n_out, device=dev, dtype=dt) for n_out in outs]

    def packed():
        sh = kernels.shrink_lora(x, pages, meta)
        for m, y in enumerate(ys):
            sh.add_to(y, m)

    def per_member():
        for y, mp in zip(ys, pages.members):
            kernels.add_lora(y, x, mp, meta)

    t = time_many({"packed": packed, "per_member": per_member}, device=dev, **timing)
    row = {"point": f"packed_{label}", "tokens": len(slots), "distinct": meta.num_active, "in": n_in,
           "outs": list(outs), "rank": 16, "packed_ms": t["packed"]["ms"], "per_member_ms": t["per_member"]["ms"],
           "packed_vs_per_member": t["packed"]["ms"] / t["per_member"]["ms"]}
    res.write(row)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def run_packed(res, hidden: int, inter: int, kv: int, dt, dev, timing: dict) -> dict:
    """time_packed on q/k/v of MHA, k/v of GQA and gate/up, at decode (32 on 32, 1 on 1) and prefill."""
    rows = {}
    for label, slots in (("decode_t32_k32", list(range(32))), ("decode_t1_k1", [0]),
                         ("prefill_t2048_k32", [j for j in range(32) for _ in range(64)])):
        for fam, outs in (("qkv", (hidden,) * 3), ("kv", (kv, kv)), ("gateup", (inter, inter))):
            rows[f"{fam}_{label}"] = time_packed(res, f"{fam}_{label}", slots, hidden, outs, dt, dev, timing)
    return rows
