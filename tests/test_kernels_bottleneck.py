"""Bottleneck adapters: the Triton kernels (interpreter, fp32/fp16) and the CPU backend, each against the
exact float64 reference; every activation mixed in one batch, per-slot widths, ``u`` aliasing ``y``, and the
weights as pages in every layout with NaN in the rows no run owns."""
from __future__ import annotations

import re

import pytest
import torch

import kernels
from kernels import ACT_CODES, AdapterPages, DeltaKernelMeta
from kernels.cpu import choose_plan, cpu_add_bottleneck, force_plan, grouped, plans
from kernels.reference import ref_add_bottleneck
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import (BACKENDS, DEVICE, FP32_TOL, LAYOUTS, PATTERNS, adapter_pages, bottleneck_pools, on,
                                slot_ids, slots_tensor)

WIDTHS = (1, 4, 8, 16, 32)
KEYS = ("down", "down_bias", "up", "up_bias", "scale", "width", "act")


def _case(num_tokens, num_deltas, pattern, hidden, dtype, *, seed=0, none_fraction=0.2, device=DEVICE):
    pool_slots = num_deltas + 2
    slots = slot_ids(num_tokens, num_deltas, pattern, pool_slots=pool_slots, seed=seed, none_fraction=none_fraction)
    widths = [WIDTHS[(s + seed) % len(WIDTHS)] for s in range(pool_slots)]
    acts = [(s + seed) % len(ACT_CODES) for s in range(pool_slots)]  # every activation in one batch
    pools = bottleneck_pools(pool_slots, hidden, widths, acts, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 3)
    y = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
    u = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
    return slots, pools, y, u


def _args(p):
    """The dense pools as the exact reference reads them."""
    return [p[k] for k in KEYS]


def _pages(pools, layout="scattered", seed=0, fill=float("nan")):
    return adapter_pages(pools, layout=layout, seed=seed, fill=fill)


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_matches_reference(num_tokens, num_deltas, pattern):
    slots, pools, y, u = _case(num_tokens, num_deltas, pattern, 40, torch.float32, seed=num_deltas, device="cpu")
    expected = ref_add_bottleneck(y, u, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    layout = LAYOUTS[(num_tokens + num_deltas) % len(LAYOUTS)]
    with on("cpu"):
        kernels.add_bottleneck(y, u, _pages(pools, layout), meta)
    assert_close(y, expected, **FP32_TOL, what=f"cpu plan={choose_plan(meta)} {layout} slots={slots}")


@pytest.mark.parametrize("slots", [[0] * 6 + [1] * 6 + [-1, 2, 2, 2, 2], [0, 1, 2] * 6, [2, 0, -1, 1]],
                         ids=["runs", "segments", "gather"])
def test_output_placement_reads_y_before_writing_it(slots):
    # "output" placement: the adapter reads the very tensor it adds to.
    pools = bottleneck_pools(3, 24, [8, 32, 3], [1, 2, 3], device=DEVICE)
    y = torch.randn(len(slots), 24, device=DEVICE)
    expected = ref_add_bottleneck(y, y, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.add_bottleneck(out, out, _pages(pools), meta)
        assert_close(out, expected, **FP32_TOL, what=f"{name} aliased")
    for plan in plans.PLANS:
        out = y.clone()
        with force_plan(plan):
            cpu_add_bottleneck(out, out, _pages(pools, "regions"), meta)
        assert_close(out, expected, **FP32_TOL, what=f"cpu {plan} aliased")


TRITON_CASES = [(1, 1, "identical"), (3, 3, "distinct"), (17, 8, "uniform"), (64, 8, "zipf"), (64, 3, "skewed"),
                (17, 1, "distinct")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", TRITON_CASES)
def test_triton_matches_reference(num_tokens, num_deltas, pattern, dtype):
    hidden = (24, 40, 72)[num_tokens % 3]
    slots, pools, y, u = _case(num_tokens, num_deltas, pattern, hidden, dtype, seed=num_tokens)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_add_bottleneck(y, u, *_args(pools), slots)
    with on("triton"):
        kernels.add_bottleneck(y, u, _pages(pools, LAYOUTS[num_tokens % len(LAYOUTS)]), meta)
    tol = TOLERANCES[dtype] if dtype != torch.float32 else FP32_TOL
    assert_close(y, expected, **tol, what=f"triton {dtype} slots={slots}")


@pytest.mark.parametrize("name, code", sorted(ACT_CODES.items()))
def test_each_activation_alone(name, code):
    pools = bottleneck_pools(2, 40, [16, 16], [code, code], device=DEVICE)
    pools["down_bias"].mul_(8)  # pre-activations on both sides of 0, where the four activations differ most
    slots = [0, 1, 1, 0, -1]
    y, u = torch.randn(5, 40, device=DEVICE), torch.randn(5, 40, device=DEVICE)
    expected = ref_add_bottleneck(y, u, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for backend_name in BACKENDS:
        out = y.clone()
        with on(backend_name):
            kernels.add_bottleneck(out, u, _pages(pools), meta)
        assert_close(out, expected, atol=5e-5, rtol=2e-5, what=f"{name} {backend_name}")


def test_width_zero_slot_adds_nothing_not_even_up_bias():
    pools = bottleneck_pools(3, 24, [8, 0, 4], [0, 0, 3], device=DEVICE)
    pools["up_bias"][1] = 5.0
    slots = [1, 0, 1, 2, 1, 1, 0]  # gather plan: slot 1 shares the batched matmuls
    y, u = torch.randn(7, 24, device=DEVICE), torch.randn(7, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.add_bottleneck(out, u, _pages(pools), meta)
        assert torch.equal(out[[0, 2, 4, 5]], y[[0, 2, 4, 5]]), name


def test_unknown_activation_code_is_refused():
    pools = bottleneck_pools(2, 24, [4, 4], [0, 7])
    meta = DeltaKernelMeta.build(slots_tensor([0, 1]))
    with pytest.raises(ValueError, match=r"act\[1\] = 7"), on("cpu"):
        kernels.add_bottleneck(torch.randn(2, 24), torch.randn(2, 24), _pages(pools), meta)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bad_input_raises_value_error_naming_argument(backend_name):
    # the public op checks once, before either backend runs
    pools = bottleneck_pools(3, 24, [4, 8, 16], [0, 1, 2], device=DEVICE)
    y, u = torch.randn(5, 24, device=DEVICE), torch.randn(5, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, 2, -1, 0], DEVICE))
    p = _pages(pools)
    fields = ("down_rows", "up_rows", "down_bias", "up_bias_rows", "start", "up_bias_row", "width", "scale", "act",
              "max_width")

    def pages(**change):
        return AdapterPages(**{**{k: getattr(p, k) for k in fields}, **change})

    good = dict(y=y, u=u, pages=p, meta=meta)
    cases = [
        ("u", dict(u=torch.randn(5, 23, device=DEVICE)), "[5, 23]"),
        ("pages.down_bias", dict(pages=pages(down_bias=p.down_bias[:8])), "[8]"),
        ("pages.up_rows", dict(pages=pages(up_rows=p.up_rows.half())), "dtype torch.float16"),
        ("pages.up_bias_rows", dict(pages=pages(up_bias_rows=p.up_bias_rows[:, :8])), "[*, 24]"),
        ("pages.width", dict(pages=pages(width=p.width.long())), "dtype torch.int64"),
        ("pages.act", dict(pages=pages(act=p.act[:2])), "[2]"),
        ("pages.scale", dict(pages=pages(scale=p.scale.double())), "torch.float64"),
        ("pages.down_rows", dict(pages=pages(down_rows=p.down_rows.t().contiguous().t())), "unit stride"),
        ("pages.max_width", dict(pages=pages(max_width=1.5)), "non-negative int"),
        ("meta", dict(meta=DeltaKernelMeta.build(slots_tensor([0], DEVICE))), "1 tokens"),
    ]
    for name, change, fragment in cases:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")) as info, on(backend_name):
            kernels.add_bottleneck(**{**good, **change})
        assert fragment in str(info.value), (name, str(info.value))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 7, 133, 1024])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_large_grid_on_gpu(num_tokens, pattern, dtype):
    slots, pools, y, u = _case(num_tokens, 16, pattern, 2049, dtype, seed=num_tokens)
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    expected = ref_add_bottleneck(y, u, *_args(pools), slots)
    with on("triton"):
        kernels.add_bottleneck(y, u, _pages(pools, "regions", seed=num_tokens), meta)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(y, expected, **tol, what=f"cuda {dtype} T={num_tokens} {pattern}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("plan", plans.PLANS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_plan_on_every_pattern(plan, pattern, dtype):
    slots, pools, y, u = _case(17, 8, pattern, 24, dtype, seed=5, device="cpu")
    expected = ref_add_bottleneck(y, y, *_args(pools), slots)
    if plan == "grouped":  # the forced plan really runs (it falls back to "gather" where it cannot)
        if not grouped.supported(y):
            pytest.skip(f"F.grouped_mm does not run on this torch for {dtype}")
        pg = _pages(pools)
        assert grouped.bottleneck_ok(y, pg.down_rows, pg.up_rows), dtype
    with force_plan(plan):
        cpu_add_bottleneck(y, y, _pages(pools, LAYOUTS[len(pattern) % len(LAYOUTS)]), DeltaKernelMeta.build(slots_tensor(slots)))
    tol = FP32_TOL if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(y, expected, **tol, what=f"forced {plan} {dtype}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_with_nan_in_unowned_rows(layout):
    slots = [0, 1, 2, 0, -1, 2, 1, 1, 5, 4, 3, 5]
    widths, acts = [8, 32, 3, 16, 1, 5], [0, 1, 3, 2, 1, 0]
    pools = bottleneck_pools(6, 40, widths, acts, device=DEVICE)
    y, u = torch.randn(12, 40, device=DEVICE), torch.randn(12, 40, device=DEVICE)
    expected = ref_add_bottleneck(y, u, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.add_bottleneck(out, u, _pages(pools, layout, seed=3), meta)
        assert_close(out, expected, **FP32_TOL, what=f"{name} {layout}")


def test_checks_after_a_passing_call_still_refuse_bad_activations():
    """The short check path once pages have passed (kernels/_checks.py) still refuses bad activations or meta."""
    slots, pools, y, u = _case(5, 3, "uniform", 24, torch.float32, device="cpu")
    pages, meta = _pages(pools), DeltaKernelMeta.build(slots_tensor(slots))
    with on("cpu"):
        kernels.add_bottleneck(y, u, pages, meta)  # passes: the pages are remembered
        for yy, uu, m, frag in [(y, torch.randn(5, 23), meta, "u has shape [5, 23]"),
                                (y, u.half(), meta, "torch.float16"), (y, torch.randn(24, 5).t(), meta, "unit stride"),
                                (torch.randn(4, 24), torch.randn(4, 24), meta, "meta is for 5"),
                                (y, u, "meta", "meta must be a DeltaKernelMeta")]:
            with pytest.raises(ValueError, match=re.escape(frag)):
                kernels.add_bottleneck(yy, uu, pages, m)
