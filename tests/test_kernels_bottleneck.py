"""Bottleneck adapters: the Triton kernels (interpreter, fp32/fp16) and the CPU backend, each against the
exact float64 reference; every activation mixed in one batch, per-slot widths, and ``u`` aliasing ``y``."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import ACT_CODES, DeltaKernelMeta
from kernels.cpu import choose_plan, cpu_add_bottleneck, force_plan, grouped, plans
from kernels.reference import ref_add_bottleneck
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import (BACKENDS, DEVICE, FP32_TOL, PATTERNS, bottleneck_pools, on, slot_ids, slots_tensor,
                                transposed_storage)

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
    return [p[k] for k in KEYS]


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_matches_reference(num_tokens, num_deltas, pattern):
    slots, pools, y, u = _case(num_tokens, num_deltas, pattern, 40, torch.float32, seed=num_deltas, device="cpu")
    expected = ref_add_bottleneck(y, u, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    with on("cpu"):
        kernels.add_bottleneck(y, u, *_args(pools), meta)
    assert_close(y, expected, **FP32_TOL, what=f"cpu plan={choose_plan(meta)} slots={slots}")


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
            kernels.add_bottleneck(out, out, *_args(pools), meta)
        assert_close(out, expected, **FP32_TOL, what=f"{name} aliased")
    for plan in plans.PLANS:
        out = y.clone()
        with force_plan(plan):
            cpu_add_bottleneck(out, out, *_args(pools), meta)
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
        kernels.add_bottleneck(y, u, *_args(pools), meta)
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
            kernels.add_bottleneck(out, u, *_args(pools), meta)
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
            kernels.add_bottleneck(out, u, *_args(pools), meta)
        assert torch.equal(out[[0, 2, 4, 5]], y[[0, 2, 4, 5]]), name


def test_unknown_activation_code_is_refused():
    pools = bottleneck_pools(2, 24, [4, 4], [0, 7])
    meta = DeltaKernelMeta.build(slots_tensor([0, 1]))
    with pytest.raises(ValueError, match=r"act\[1\] = 7"), on("cpu"):
        kernels.add_bottleneck(torch.randn(2, 24), torch.randn(2, 24), *_args(pools), meta)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bad_input_raises_value_error_naming_argument(backend_name):
    # the public op checks once, before either backend runs
    pools = bottleneck_pools(3, 24, [4, 8, 16], [0, 1, 2], device=DEVICE)
    y, u = torch.randn(5, 24, device=DEVICE), torch.randn(5, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, 2, -1, 0], DEVICE))
    good = dict(y=y, u=u, **pools, meta=meta)
    cases = [
        ("u", dict(u=torch.randn(5, 23, device=DEVICE)), "[5, 23]"),
        ("down_bias", dict(down_bias=pools["down_bias"][:, :8]), "[3, 8]"),
        ("up", dict(up=pools["up"].half()), "dtype torch.float16"),
        ("up_bias", dict(up_bias=pools["up_bias"][:2]), "[2, 24]"),
        ("width", dict(width=pools["width"].long()), "dtype torch.int64"),
        ("act", dict(act=pools["act"][:2]), "[2]"),
        ("scale", dict(scale=pools["scale"].double()), "torch.float64"),
        ("down", dict(down=pools["down"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
        ("meta", dict(meta=DeltaKernelMeta.build(slots_tensor([0], DEVICE))), "1 tokens"),
    ]
    for name, change, fragment in cases:
        with pytest.raises(ValueError, match=name) as info, on(backend_name):
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
        kernels.add_bottleneck(y, u, *_args(pools), meta)
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
        assert grouped.bottleneck_ok(y, pools["down"], pools["up"]), dtype
    with force_plan(plan):
        cpu_add_bottleneck(y, y, *_args(pools), DeltaKernelMeta.build(slots_tensor(slots)))
    tol = FP32_TOL if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(y, expected, **tol, what=f"forced {plan} {dtype}")


def test_up_stored_transposed():
    slots = [0, 1, 2, 0, -1, 2, 1, 1]
    pools = bottleneck_pools(3, 40, [8, 32, 3], [0, 1, 3], device=DEVICE)
    pools["up"] = transposed_storage(pools["up"])
    y, u = torch.randn(8, 40, device=DEVICE), torch.randn(8, 40, device=DEVICE)
    expected = ref_add_bottleneck(y, u, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.add_bottleneck(out, u, *_args(pools), meta)
        assert_close(out, expected, **FP32_TOL, what=name)
