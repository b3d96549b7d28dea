"""The strided plan of the CPU backend (``kernels/cpu/strided.py``): blocks of evenly spaced cells cut by the cost
model, plans shared by the layers of a step, free cells inside a block read (NaN there) and dropped, tokens padded
per cell, the shrink sliced past SHRINK_ROWS, tokens already in cell order added straight into y; LoRA and
bottleneck adapters against the exact reference and against the other plans over odd sizes, ranks 1-64 mixed,
popularity patterns with base tokens mixed in, and every page layout."""
from __future__ import annotations

import pytest
import torch

from kernels import DeltaKernelMeta
from kernels.cpu import blocks, choose_plan, cpu_add_bottleneck, cpu_add_lora, force_plan, plans, strided
from kernels.reference import ref_add_bottleneck, ref_add_lora
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import (FP32_TOL, LAYOUTS, PATTERNS, adapter_pages, bottleneck_pools, lora_pages, lora_pools,
                                mixed_rank_lora_case, slot_ids, slots_tensor)

NAN = float("nan")
LORA_KEYS = ("lora_a", "lora_b", "scale", "rank")
BN_KEYS = ("down", "down_bias", "up", "up_bias", "scale", "width", "act")
BN_TOL = dict(atol=5e-5, rtol=2e-5)  # fp32 bottleneck at these sizes (biases and activations on top of LoRA's)


def _meta(slots):
    return DeltaKernelMeta.build(slots_tensor(slots))


def _blocks(p):
    return [[(b.head, b.stride, b.cells, b.tokens) for b in rk.blocks] for rk in p.ranks]


def _lora(slots, pools, pages, x, y, plan="strided"):
    out = y.clone()
    with force_plan(plan):
        cpu_add_lora(out, x, pages, _meta(slots))
    return out


# ------------------------------------------------------------------------------------------- blocks
def test_free_cells_cost_against_a_new_block():
    # rank 16 in a region of 16-row cells: slots 0, 1, 2 in cells 0-2, slot 3 after one free cell (cell 4: cheaper
    # computed and dropped than a block of its own), slot 4 after two more (cell 7: a block of its own)
    ranks = {s: 16 for s in range(5)}
    starts = {0: 0, 1: 16, 2: 32, 3: 64, 4: 112}
    meta = _meta([4, 3, 2, 1, 0])
    p = blocks.plan(meta, ranks, starts, meta.active_slots_host)
    assert _blocks(p) == [[(0, 16, 5, 1), (4, 16, 1, 1)]]
    assert p.rows == 6 and p.real.tolist() == [0, 1, 2, 4, 5] and p.pads.tolist() == [3]
    assert p.tok.tolist() == [4, 3, 2, 1, 0]  # token of each real row: slot 0's token is token 4
    # rank 4: a free cell costs 4 rows, so two of them are still cheaper than a block
    small = blocks.plan(_meta([0, 1, 2]), {s: 4 for s in range(3)}, {0: 0, 1: 4, 2: 16}, [0, 1, 2])
    assert _blocks(small) == [[(0, 4, 5, 1)]]
    far = blocks.plan(_meta([0, 1, 2]), {s: 16 for s in range(3)}, {0: 0, 1: 16, 2: 64}, [0, 1, 2])
    assert _blocks(far) == [[(0, 16, 2, 1), (2, 16, 1, 1)]]  # the same at rank 16: a block of its own


def test_a_hot_slot_gets_a_block_of_its_own():
    ranks = {s: 16 for s in range(4)}
    starts = {0: 0, 1: 16, 2: 32, 3: 48}
    meta = _meta([0] * 20 + [1, 2, 3])
    p = blocks.plan(meta, ranks, starts, meta.active_slots_host)
    assert _blocks(p) == [[(0, 16, 1, 20), (1, 16, 3, 1)]]  # not 4 cells padded to 20 rows each
    assert p.rows == 23 and p.pads is None


def test_one_block_per_rank_and_runs_off_the_lattice():
    # D3: one true rank per bmm; slot 5 (rank 4) sits off the lattice of slots 1 and 4
    ranks = {1: 4, 2: 16, 4: 4, 5: 4}
    starts = {1: 40, 2: 0, 4: 48, 5: 51}
    meta = _meta([4, 2, 1, 5, -1])
    p = blocks.plan(meta, ranks, starts, meta.active_slots_host)
    assert [rk.size for rk in p.ranks] == [4, 16]
    assert _blocks(p) == [[(1, 8, 2, 1), (5, 4, 1, 1)], [(2, 16, 1, 1)]]


def test_plans_are_built_once_per_step_and_shared_by_layers():
    ranks = {s: 8 for s in range(3)}
    starts = {0: 0, 1: 8, 2: 16}
    meta = _meta([2, 0, 1])
    p = blocks.plan(meta, ranks, starts, [0, 1, 2])
    assert blocks.plan(meta, ranks, dict(starts), [0, 1, 2]) is p
    assert blocks.plan(meta, ranks, {s: a + 800 for s, a in starts.items()}, [0, 1, 2]) is p  # a region further on
    assert blocks.plan(_meta([2, 0, 1]), ranks, starts, [0, 1, 2]) is p  # a later step with the same token layout
    other = blocks.plan(_meta([2, 0, 0, 1]), ranks, starts, [0, 1, 2])  # another layout: slot 0 has 2 tokens now
    assert other is not p and sorted(set(other.src.tolist())) == [0, 1, 2, 3]
    # a layer where slot 2 has no LoRA and slot 1 sits where 2 was: same ranks and starts in work order, other slots
    q = blocks.plan(meta, {0: 8, 1: 8}, {0: 8, 1: 16}, [0, 1])
    r = blocks.plan(meta, {1: 8, 2: 8}, {1: 8, 2: 16}, [1, 2])
    assert q is not r and q.src.tolist() == [1, 2] and r.src.tolist() == [2, 0]


def test_layouts_kept_across_steps_are_bounded():
    for n in range(blocks.MAX_LAYOUTS + 5):
        blocks.plan(_meta(list(range(n % 7 + 1)) + [-1] * (n // 7)), {s: 8 for s in range(7)},
                     {s: 8 * s for s in range(7)}, list(range(n % 7 + 1)))
    assert len(blocks._LAYOUTS) <= blocks.MAX_LAYOUTS


def test_tokens_in_cell_order_need_no_gather_and_add_into_y():
    meta = _meta([0, 1, 2, 3])
    p = blocks.plan(meta, {s: 8 for s in range(4)}, {s: 8 * s for s in range(4)}, [0, 1, 2, 3])
    assert p.src is None and p.tok is None and p.pads is None
    pools = lora_pools(4, 37, 23, [8] * 4)
    pages = lora_pages(pools, at=([0, 8, 16, 24], 32), fill=NAN)
    x, y = torch.randn(4, 37), torch.randn(4, 23)
    expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], [0, 1, 2, 3])
    assert_close(_lora([0, 1, 2, 3], pools, pages, x, y), expected, **FP32_TOL, what="in order, into y")
    # y a column slice of a wider tensor and x a transposed view: the plan goes through its buffers instead
    wide = torch.randn(4, 40)
    wide[:, :23] = y
    tail = wide[:, 23:].clone()
    xv = torch.empty(37, 4).t().copy_(x)  # [4, 37], strides (1, 4)
    with force_plan("strided"):
        cpu_add_lora(wide[:, :23], xv, pages, meta)
    assert_close(wide[:, :23], expected, **FP32_TOL, what="in order, strided y")
    assert torch.equal(wide[:, 23:], tail)  # the columns past y's are not touched


# ------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_matches_reference_and_the_other_plans(pattern, layout):
    slots, x, y, pages, expected = mixed_rank_lora_case(pattern, layout)  # bmm does not care about odd widths
    out = _lora(slots, None, pages, x, y)
    assert_close(out, expected, **FP32_TOL, what=f"strided {pattern} {layout}")
    untouched = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(out[untouched], y[untouched])  # base tokens: bit for bit
    for other in ("gather", "segments"):
        assert_close(out, _lora(slots, None, pages, x, y, other), **FP32_TOL, what=f"strided vs {other}")


@pytest.mark.parametrize("fill", [NAN, float("inf")])
def test_free_cells_inside_a_block_are_read_and_dropped(fill):
    # slots 0-3 of rank 16 in cells 0, 1, 3 and 5 of a region: one block of 6 cells reads cell 2, a free cell
    # (NaN or inf there), and cell 4, slot 4's (resident, idle this step); neither reaches y
    pools = lora_pools(5, 24, 40, [16] * 5, max_rank=16)
    at = ([0, 16, 48, 80, 64], 96)
    pages = lora_pages(pools, at=at, fill=fill)
    slots = [3, -1, 0, 2, 1]
    meta = _meta(slots)
    starts = dict(zip(range(5), at[0]))
    p = blocks.plan(meta, {s: 16 for s in range(5)}, starts, meta.active_slots_host)
    assert _blocks(p) == [[(0, 16, 6, 1)]] and p.pads.numel() == 2
    x, y = torch.randn(5, 24), torch.randn(5, 40)
    out = _lora(slots, pools, pages, x, y)
    assert torch.isfinite(out).all()
    assert_close(out, ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots), **FP32_TOL, what="free cells")


@pytest.mark.parametrize("hot", [20, 70])
def test_long_cells_slice_the_shrink(hot):
    # a slot with 20 tokens (shrink in slices of SHRINK_ROWS) or 70 (past SHRINK_SLICED_MAX: one call) beside
    # decode tokens, interleaved
    assert strided.SHRINK_ROWS < 20 <= strided.SHRINK_SLICED_MAX < 70
    pools = lora_pools(6, 40, 24, [16, 8, 16, 64, 16, 16])
    slots = [0] * hot + [1, 2, 3, 4, 5]
    order = torch.randperm(len(slots), generator=torch.Generator().manual_seed(hot)).tolist()
    slots = [slots[i] for i in order]
    x, y = torch.randn(len(slots), 40), torch.randn(len(slots), 24)
    pages = lora_pages(pools, layout="regions", fill=NAN)
    assert_close(_lora(slots, pools, pages, x, y), ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots),
                 **FP32_TOL, what=f"hot slot with {hot} tokens")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lora_in_half_types(dtype):
    ranks = [1, 4, 8, 16, 64, 0, 4, 16]
    pools = lora_pools(8, 32, 48, ranks, dtype=dtype)
    slots = [6, 0, -1, 4, 3, 5, 1, 2, 7, 6, -1, 4, 0, 2]
    x, y = torch.randn(len(slots), 32).to(dtype), torch.randn(len(slots), 48).to(dtype)
    expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots)
    out = _lora(slots, pools, lora_pages(pools, layout="regions", fill=NAN), x, y)
    assert_close(out, expected, **TOLERANCES[dtype], what=f"strided {dtype}")
    assert torch.equal(out[[2, 5, 10]], y[[2, 5, 10]])  # slot -1 twice, and slot 5 (rank 0 here)


# ------------------------------------------------------------------------------------------- bottleneck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pattern", ["distinct", "zipf", "skewed"])
@pytest.mark.parametrize("alias", [False, True], ids=["u", "u_is_y"])
def test_bottleneck_matches_reference(dtype, pattern, alias):
    widths = [8, 3, 0, 16, 8, 5, 16, 1, 8, 3]
    acts = [1, 3, 0, 2, 0, 3, 1, 1, 2, 0]
    pools = bottleneck_pools(10, 40, widths, acts, max_width=16, dtype=dtype, seed=2)
    slots = slot_ids(23, 8, pattern, pool_slots=10, seed=3, none_fraction=0.2)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(23, 40, generator=g).to(dtype)
    u = y if alias else torch.randn(23, 40, generator=g).to(dtype)
    expected = ref_add_bottleneck(y, u, *[pools[k] for k in BN_KEYS], slots)
    out = y.clone()
    with force_plan("strided"):
        cpu_add_bottleneck(out, out if alias else u, adapter_pages(pools, layout="regions", fill=NAN), _meta(slots))
    tol = BN_TOL if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(out, expected, **tol, what=f"strided bottleneck {dtype} {pattern}")
    untouched = [i for i, s in enumerate(slots) if s < 0 or widths[s] == 0]
    assert torch.equal(out[untouched], y[untouched])


def test_bottleneck_in_cell_order_with_u_aliasing_y():
    # every token in cell order: the plan reads u in place, so with u = y it copies the rows first
    widths, acts = [8, 8, 8], [1, 2, 3]
    pools = bottleneck_pools(3, 24, widths, acts, max_width=8)
    pages = adapter_pages(pools, at=([0, 8, 16], 24), fill=NAN)
    meta = _meta([0, 1, 2])
    assert blocks.plan(meta, dict(enumerate(widths)), {0: 0, 1: 8, 2: 16}, [0, 1, 2]).src is None
    y = torch.randn(3, 24)
    expected = ref_add_bottleneck(y, y, *[pools[k] for k in BN_KEYS], [0, 1, 2])
    out = y.clone()
    with force_plan("strided"):
        cpu_add_bottleneck(out, out, pages, meta)
    assert_close(out, expected, **BN_TOL, what="in order, u is y")
    with force_plan("gather"):  # the same on another plan
        other = y.clone()
        cpu_add_bottleneck(other, other, pages, meta)
    assert_close(out, other, **BN_TOL, what="strided vs other plan")


# ------------------------------------------------------------------------------------------- choice
def test_strided_is_chosen_for_decode_in_fp32():
    decode = _meta([5, 3, 0, 1, -1, 2, 4])
    assert choose_plan(decode) == "strided"
    assert choose_plan(decode, grouped_ok=False) == "strided"  # it needs no grouped_mm
    assert choose_plan(decode, dtype=torch.bfloat16) != "strided"
    few = _meta([i % 4 for i in range(4 * plans.STRIDED_MAX_SEG)])  # STRIDED_MAX_SEG tokens a slot, interleaved
    assert choose_plan(few) == "strided"
    hot = _meta([0, 1] * 2 + [0] * plans.STRIDED_MAX_SEG)
    assert choose_plan(hot) == ("grouped" if plans.GROUPED_CPU_FP32 else "segments")


def test_inference_mode_then_normal_mode(monkeypatch):
    # the server runs its forwards in inference mode; buffers (and their views) first made there are inference
    # tensors, which torch refuses to write outside it: a later call outside (a test, a benchmark) remakes them
    from kernels.cpu.tensors import WS
    monkeypatch.setattr(WS, "buffers", {})
    pools = lora_pools(6, 24, 40, [16, 4, 16, 8, 16, 1])
    pages = lora_pages(pools, layout="regions", fill=NAN)
    for slots in ([3, 1, 0, 2, -1, 4, 5], [0, 1, 2, 3, 4, 5]):  # gathered rows, then every token in cell order
        meta = _meta(slots)
        x, y = torch.randn(len(slots), 24), torch.randn(len(slots), 40)
        expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots)
        with torch.inference_mode(), force_plan("strided"):
            inside = y.clone()
            cpu_add_lora(inside, x, pages, meta)
        assert_close(inside, expected, **FP32_TOL, what="inside inference mode")
        outside = y.clone()
        with force_plan("strided"):
            cpu_add_lora(outside, x, pages, meta)  # the same meta, so the same plan and its kept views
        assert_close(outside, expected, **FP32_TOL, what="outside, after")
    bn = bottleneck_pools(3, 24, [8, 4, 8], [1, 0, 3], max_width=8)
    bpages = adapter_pages(bn, layout="regions", fill=NAN)
    slots = [2, 0, 1, 0]
    y = torch.randn(4, 24)
    expected = ref_add_bottleneck(y, y, *[bn[k] for k in BN_KEYS], slots)
    with torch.inference_mode(), force_plan("strided"):
        cpu_add_bottleneck(y.clone(), y.clone(), bpages, _meta(slots))
    out = y.clone()
    with force_plan("strided"):
        cpu_add_bottleneck(out, out, bpages, _meta(slots))
    assert_close(out, expected, **BN_TOL, what="bottleneck outside, after")
