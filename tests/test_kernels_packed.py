"""Packed LoRA (``kernels.shrink_lora``): one shrink over each slot's stack of sibling A rows, then each member's
expand. The CPU backend (each plan) and the Triton kernels (interpreter on CPU) against the exact float64
reference and against the per-member ``add_lora``, over odd sizes, GQA-like member widths, members without LoRA
at some slots, different ranks per member, popularity patterns, prefill runs and decode, base tokens mixed in."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta, PackedLoraPages
from kernels.cpu import force_plan
from kernels.reference import ref_add_lora_packed
from tests.helpers import assert_close
from tests.kernel_cases import (DEVICE, FP32_TOL, LAYOUTS, PATTERNS, RANKS, lora_pools, on, packed_lora_pages,
                                slot_ids, slots_tensor)

NAN = float("nan")
OUTS = (40, 24, 24)  # q / k / v of a GQA attention: k and v narrower than q


def _case(slots, num_slots, n_in, outs=OUTS, *, seed=0, device="cpu", dtype=torch.float32, missing=True):
    """Member pools: ranks differ per member and slot; with ``missing``, each member lacks LoRA at some slots."""
    pools = []
    for m, n_out in enumerate(outs):
        ranks = [RANKS[(s + 2 * m + seed) % len(RANKS)] for s in range(num_slots)]
        if missing:
            ranks = [0 if (s + m) % 3 == 2 else r for s, r in enumerate(ranks)]
        pools.append(lora_pools(num_slots, n_in, n_out, ranks, dtype=dtype, device=device, seed=seed + 31 * m))
    g = torch.Generator().manual_seed(seed + 5)
    x = torch.randn(len(slots), n_in, generator=g).to(device, dtype)
    ys = [torch.randn(len(slots), n_out, generator=g).to(device, dtype) for n_out in outs]
    return pools, x, ys


def _check(slots, pools, x, ys, *, layout="scattered", seed=0, backend="cpu", plan=None, tol=FP32_TOL):
    pages, dense = packed_lora_pages(pools, layout=layout, seed=seed, fill=NAN)
    meta = DeltaKernelMeta.build(slots_tensor(slots, x.device))
    expected = [ref_add_lora_packed(y, x, *d, slots) for y, d in zip(ys, dense)]
    per_member = [y.clone() for y in ys]
    fused = [y.clone() for y in ys]
    with on(backend):
        for y, mp in zip(per_member, pages.members):
            kernels.add_lora(y, x, mp, meta)
        if plan is None:
            sh = kernels.shrink_lora(x, pages, meta)
        else:
            with force_plan(plan):
                sh = kernels.shrink_lora(x, pages, meta)
            assert sh._impl.plan in (plan, "none"), f"forced {plan}, ran {sh._impl.plan}"
        for m in reversed(range(len(fused))):  # any member order: the shrink is shared, not consumed
            sh.add_to(fused[m], m)
    base = torch.tensor([s < 0 for s in slots], device=x.device)
    for m, (got, want, ref) in enumerate(zip(fused, per_member, expected)):
        what = f"member {m} {backend} plan={plan} {layout} slots={slots}"
        assert_close(got, ref, **tol, what=what)
        assert_close(got, want, **tol, what=what + " vs per-member add_lora")
        assert torch.equal(got[base], ys[m][base]), what + ": base-only tokens changed"
    return fused


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_matches_reference_and_per_member(num_tokens, num_deltas, pattern):
    slots = slot_ids(num_tokens, num_deltas, pattern, pool_slots=num_deltas + 2, none_fraction=0.2)
    n_in = (24, 72, 40)[(num_tokens + num_deltas) % 3]
    pools, x, ys = _case(slots, num_deltas + 2, n_in)
    _check(slots, pools, x, ys, layout=LAYOUTS[(num_tokens + num_deltas) % len(LAYOUTS)])


@pytest.mark.parametrize("plan", ["runs", "grouped", "segments"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("step", ["decode", "prefill", "mixed"])
def test_each_cpu_plan(plan, layout, step):
    # in = 40 and out widths multiples of 4: the grouped plan really runs (it falls back to gather otherwise)
    if step == "decode":
        slots = slot_ids(24, 12, "distinct", pool_slots=14, none_fraction=0.2)
    elif step == "prefill":
        slots = [3] * 9 + [0] * 5 + [-1] * 3 + [7] * 11
    else:  # a chunk of prefill beside decode tokens of other slots
        slots = [5] * 13 + [1, 2, -1, 4, 6, 1, 7, 0]
    pools, x, ys = _case(slots, 14 if step == "decode" else 8, 40, outs=(40, 16, 16), seed=3)
    _check(slots, pools, x, ys, layout=layout, plan=plan)


def test_same_composition_decode_is_one_grouped_cluster():
    # 16 slots, every member rank 8 (the common case): one composition, the regions layout gives one lattice
    num = 16
    slots = list(range(num)) * 2
    pools = [lora_pools(num, 48, n_out, [8] * num, seed=m) for m, n_out in enumerate((48, 16, 16))]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots), 48, generator=g)
    ys = [torch.randn(len(slots), n, generator=g) for n in (48, 16, 16)]
    _check(slots, pools, x, ys, layout="regions", plan="grouped")


def test_no_member_has_lora_at_active_slots_changes_nothing():
    slots = [0, 1, -1, 1]
    pools = [lora_pools(3, 24, 24, [0, 0, 4], seed=m) for m in range(2)]
    x = torch.randn(4, 24)
    ys = [torch.randn(4, 24) for _ in range(2)]
    got = _check(slots, pools, x, ys)
    assert all(torch.equal(g, y) for g, y in zip(got, ys))


@pytest.mark.parametrize("num_tokens,num_deltas,pattern", [(1, 1, "identical"), (17, 3, "zipf"), (40, 8, "distinct")])
def test_triton_interpreter_matches_reference(num_tokens, num_deltas, pattern):
    slots = slot_ids(num_tokens, num_deltas, pattern, pool_slots=num_deltas + 2, none_fraction=0.2)
    pools, x, ys = _case(slots, num_deltas + 2, 40, device=DEVICE)
    _check(slots, pools, x, ys, backend="triton", layout="regions")


def test_triton_interpreter_prefill_runs():
    slots = [2] * 20 + [-1] * 3 + [0] * 18
    pools, x, ys = _case(slots, 4, 24, device=DEVICE, seed=2)
    _check(slots, pools, x, ys, backend="triton", layout="packed")


def test_refusals_name_the_argument():
    slots = [0, 1]
    pools, x, ys = _case(slots, 2, 24, missing=False)
    pages, _ = packed_lora_pages(pools)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    with pytest.raises(ValueError, match="pages must be a kernels.PackedLoraPages"):
        kernels.shrink_lora(x, pages.members[0], meta)
    other = kernels.LoraPages(pages.a_rows.clone(), *[getattr(pages.members[1], f) for f in
                                                    ("b_rows", "start", "rank", "scale", "max_rank")])
    bad = PackedLoraPages(pages.a_rows, pages.start, pages.rank, pages.max_rank, (pages.members[0], other))
    with pytest.raises(ValueError, match=r"members\[1\].a_rows .* must be pages.a_rows"):
        kernels.shrink_lora(x, bad, meta)
    with pytest.raises(ValueError, match="x has shape"):
        kernels.shrink_lora(x[:, :20], pages, meta)
    sh = kernels.shrink_lora(x, pages, meta)
    with pytest.raises(ValueError, match="member must be an int"):
        sh.add_to(ys[0], 3)
    with pytest.raises(ValueError, match="y has shape"):
        sh.add_to(ys[1], 0)  # member 0 is 40 wide, ys[1] 24
    short = PackedLoraPages(pages.a_rows, pages.start, torch.ones_like(pages.rank), pages.max_rank, pages.members)
    with on("cpu"), pytest.raises(ValueError, match="leaves its stack"):
        kernels.shrink_lora(x, short, meta)
