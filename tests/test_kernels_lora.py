"""LoRA: the Triton kernels (interpreter on CPU, fp32 and fp16) and the CPU backend, each against the exact
float64 reference, over odd sizes, mixed ranks, slot counts and popularity patterns, with the weights laid out as
pages packed, scattered, in fragmented rank-bucket regions or reversed, and NaN in every row no run owns; the
CPU plans one by one."""
from __future__ import annotations

import contextlib
import re

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta, LoraPages
from kernels.cpu import choose_plan, cpu_add_lora, force_plan, gather, grouped, plans
from kernels.reference import ref_add_lora
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import (BACKENDS, DEVICE, FP32_TOL, GARBAGE, LAYOUTS, PATTERNS, RANKS, lora_pages,
                                lora_pools, on, slot_ids, slots_tensor)

NAN = float("nan")

SHAPES = ((24, 40), (72, 24), (40, 40))  # (in, out): none a power of two


def _case(num_tokens, num_deltas, pattern, n_in, n_out, dtype, *, none_fraction=0.2, seed=0, device=DEVICE):
    pool_slots = num_deltas + 2
    slots = slot_ids(num_tokens, num_deltas, pattern, pool_slots=pool_slots, seed=seed, none_fraction=none_fraction)
    ranks = [RANKS[(s + seed) % len(RANKS)] for s in range(pool_slots)]  # every rank in one batch
    pools = lora_pools(pool_slots, n_in, n_out, ranks, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(num_tokens, n_in, generator=g).to(device, dtype)
    y = torch.randn(num_tokens, n_out, generator=g).to(device, dtype)
    return slots, pools, x, y


def _args(pools):
    """The dense pools as the exact reference reads them."""
    return pools["lora_a"], pools["lora_b"], pools["scale"], pools["rank"]


def _pages(pools, layout="scattered", seed=0, fill=NAN):
    return lora_pages(pools, layout=layout, seed=seed, fill=fill)


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_matches_reference(num_tokens, num_deltas, pattern):
    n_in, n_out = SHAPES[(num_tokens + num_deltas) % len(SHAPES)]
    slots, pools, x, y = _case(num_tokens, num_deltas, pattern, n_in, n_out, torch.float32, device="cpu")
    expected = ref_add_lora(y, x, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    layout = LAYOUTS[(num_tokens + num_deltas) % len(LAYOUTS)]
    with on("cpu"):
        kernels.add_lora(y, x, _pages(pools, layout), meta)
    assert_close(y, expected, **FP32_TOL, what=f"cpu plan={choose_plan(meta)} {layout} slots={slots}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", BACKENDS)
def test_every_layout_with_nan_in_unowned_rows(layout, name):
    # 40 resident slots, 12 of them active, every rank 1-64 in one batch: the ops follow the starts wherever the
    # runs are, and never read a row no run owns (NaN there would poison the output, even multiplied by 0)
    ranks = [1 + (7 * s) % 64 for s in range(40)]
    pools = lora_pools(40, 40, 24, ranks, seed=5)
    slots = slot_ids(29, 12, "zipf", pool_slots=40, seed=6, none_fraction=0.2)
    x, y = torch.randn(29, 40), torch.randn(29, 24)
    expected = ref_add_lora(y, x, *_args(pools), slots)
    with on(name):
        kernels.add_lora(y, x, _pages(pools, layout, seed=2), DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(y, expected, **FP32_TOL, what=f"{name} {layout}")


@pytest.mark.parametrize("slots, plan, without_grouped, in_half", [
    ([0] * 9 + [2] * 7 + [-1] * 3 + [1] * 5, "runs", "runs", "runs"),  # prefill: one run per sequence
    ([0, 1] * 10 + [-1, 1], "grouped", "segments", "segments"),  # many tokens per slot, interleaved
    ([3, 1, 0, 2, -1, 4], "strided", "strided", "gather"),  # decode: one token per slot (bmm, no grouped_mm)
    ([3, 1, 0, 2, 4] * 2, "strided", "strided", "gather"),  # two tokens per slot
])
def test_each_cpu_plan(slots, plan, without_grouped, in_half, monkeypatch):
    pools = lora_pools(5, 40, 24, [16, 1, 64, 4, 0])
    x, y = torch.randn(len(slots), 40), torch.randn(len(slots), 24)
    expected = ref_add_lora(y, x, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    # fp32 on the CPU: grouped_mm is there from torch 2.13 (an older torch keeps the older plans)
    assert choose_plan(meta) == (plan if plans.GROUPED_CPU_FP32 else without_grouped)
    assert choose_plan(meta, grouped_ok=False) == without_grouped
    assert choose_plan(meta, dtype=torch.float16) == in_half  # bmm and grouped_mm are slower in half types here
    out = y.clone()
    cpu_add_lora(out, x, _pages(pools), meta)
    assert_close(out, expected, **FP32_TOL, what=plan)
    # where grouped_mm is missing (the probe said no), the same call takes the older plan
    monkeypatch.setitem(grouped._SUPPORTED, ("cpu", torch.float32), False)
    out = y.clone()
    cpu_add_lora(out, x, _pages(pools), meta)
    assert_close(out, expected, **FP32_TOL, what=without_grouped)


TRITON_CASES = [  # (tokens, deltas, pattern): every size, slot count and pattern at least once
    (1, 1, "identical"), (3, 3, "distinct"), (17, 8, "uniform"), (64, 8, "zipf"), (64, 3, "skewed"),
    (17, 3, "distinct"), (64, 1, "uniform"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", TRITON_CASES)
def test_triton_matches_reference(num_tokens, num_deltas, pattern, dtype):
    n_in, n_out = SHAPES[num_tokens % len(SHAPES)]
    slots, pools, x, y = _case(num_tokens, num_deltas, pattern, n_in, n_out, dtype, seed=num_tokens)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_add_lora(y, x, *_args(pools), slots)
    with on("triton"):
        kernels.add_lora(y, x, _pages(pools, LAYOUTS[num_tokens % len(LAYOUTS)], seed=num_deltas), meta)
    tol = TOLERANCES[dtype] if dtype != torch.float32 else FP32_TOL
    assert_close(y, expected, **tol, what=f"triton {dtype} slots={slots}")


def test_untouched_tokens_and_rank_zero_slots_are_bit_exact():
    slots = [0, -1, 1, 1, -1, 2]
    pools = lora_pools(3, 24, 40, [8, 0, 64], device=DEVICE)  # slot 1 has no LoRA at this layer
    x, y = torch.randn(6, 24, device=DEVICE), torch.randn(6, 40, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.add_lora(out, x, _pages(pools), meta)
        untouched = [1, 2, 3, 4]
        assert torch.equal(out[untouched], y[untouched]), name
        assert not torch.equal(out[[0, 5]], y[[0, 5]]), name


@pytest.mark.parametrize("fill", [GARBAGE, NAN], ids=["garbage", "nan"])
def test_rows_past_rank_are_never_read(fill):
    # Rows no run owns hold GARBAGE (1e3) or NaN; a kernel that used rows past a slot's rank would be off by ~1e3
    # or NaN. The runs are packed back to back here, so the row after a run is the next slot's.
    slots = [0, 1, 2, 0]
    pools = lora_pools(3, 24, 24, [1, 4, 16], device=DEVICE)
    pages = _pages(pools, "regions", fill=fill)
    x, y = torch.randn(4, 24, device=DEVICE), torch.randn(4, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_add_lora(y, x, *_args(pools), slots)
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.add_lora(out, x, pages, meta)
        assert_close(out, expected, **FP32_TOL, what=name)


def test_no_delta_returns_without_work():
    pools = lora_pools(2, 24, 24, [4, 4], device=DEVICE)
    x, y = torch.randn(5, 24, device=DEVICE), torch.randn(5, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor([-1] * 5, DEVICE))
    out = y.clone()
    for name in BACKENDS:
        with on(name):
            kernels.add_lora(out, x, _pages(pools), meta)
    assert torch.equal(out, y)


def test_dispatch_follows_backend():
    slots, pools, x, y = _case(17, 3, "uniform", 24, 40, torch.float32)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    outs = {}
    for name in BACKENDS:
        with kernels.backend(name):
            assert kernels.current_backend(y) == name
            outs[name] = y.clone()
            kernels.add_lora(outs[name], x, _pages(pools), meta)
    assert_close(outs["triton"], outs["cpu"], **FP32_TOL, what="dispatch")


def _bad_inputs():
    pools = lora_pools(3, 24, 40, [4, 8, 16], device=DEVICE)
    x, y = torch.randn(5, 24, device=DEVICE), torch.randn(5, 40, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, 2, -1, 0], DEVICE))
    p = _pages(pools)
    good = dict(y=y, x=x, pages=p, meta=meta)

    def pages(**change):
        return LoraPages(**{**{k: getattr(p, k) for k in ("a_rows", "b_rows", "start", "rank", "scale", "max_rank")},
                            **change})

    return good, [
        ("x", dict(x=torch.randn(5, 23)), "[5, 23]"),
        ("x", dict(x=x.half()), "dtype torch.float16"),
        ("y", dict(y=y.to(torch.int32)), "dtype torch.int32"),
        ("pages.a_rows", dict(pages=pages(a_rows=p.a_rows.t().contiguous().t())), "unit stride"),
        ("pages.b_rows", dict(pages=pages(b_rows=p.b_rows[:, :8])), "expected [32, 40]"),
        ("pages.b_rows", dict(pages=pages(b_rows=p.b_rows[:3])), "has shape [3, 40], expected [32, 40]"),
        ("pages.scale", dict(pages=pages(scale=p.scale.half())), "dtype torch.float16"),
        ("pages.rank", dict(pages=pages(rank=p.rank.long())), "dtype torch.int64"),
        ("pages.start", dict(pages=pages(start=p.start[:2])), "[2]"),
        ("pages.max_rank", dict(pages=pages(max_rank=-1)), "non-negative int"),
        ("pages", dict(pages=(p.a_rows, p.b_rows)), "LoraPages"),
        ("meta", dict(meta=DeltaKernelMeta.build(slots_tensor([0, 1], DEVICE))), "2 tokens"),
        ("x", dict(x=x.t()), "[24, 5]"),
        ("x", dict(x=torch.empty(5, 24, device="meta")), "is on meta"),
    ]


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_raises_value_error_naming_argument(name):
    # the public op checks once, before either backend runs
    good, cases = _bad_inputs()
    for arg, change, fragment in cases:
        args = {**good, **change}
        with pytest.raises(ValueError, match=arg.replace(".", r"\.")) as info, on(name):
            kernels.add_lora(**args)
        assert fragment in str(info.value), (arg, str(info.value))


def test_run_leaving_the_pages_is_refused_by_cpu_backend():
    pools = lora_pools(2, 24, 24, [4, 4], max_rank=16)
    p = _pages(pools, "packed")
    bad = LoraPages(p.a_rows, p.b_rows, torch.tensor([0, p.a_rows.shape[0] - 2], dtype=torch.int32), p.rank, p.scale,
                    4)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1]))
    with pytest.raises(ValueError, match=r"slot 1: rank 4 from row 6 leaves the 8 rows"), on("cpu"):
        kernels.add_lora(torch.randn(2, 24), torch.randn(2, 24), bad, meta)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 7, 133, 1024])
@pytest.mark.parametrize("num_deltas", [1, 8, 32])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_large_grid_on_gpu(num_tokens, num_deltas, pattern, dtype):
    n_in, n_out = (2049, 1024) if num_tokens < 1024 else (4096, 11008)
    slots, pools, x, y = _case(num_tokens, num_deltas, pattern, n_in, n_out, dtype, seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    expected = ref_add_lora(y, x, *_args(pools), slots)
    with on("triton"):
        kernels.add_lora(y, x, _pages(pools, "regions", seed=num_tokens), meta)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(y, expected, **tol, what=f"cuda {dtype} T={num_tokens} deltas={num_deltas} {pattern}")


def test_gathered_groups_split_by_rank():
    # decode-like batch mixing rank 4 and rank 64: the CPU backend gathers each rank group separately
    slots = [0, 1, 2, 3, -1, 4, 5]
    ranks = [4, 64, 4, 64, 0, 16]
    groups = list(gather.groups(DeltaKernelMeta.build(slots_tensor(slots)), dict(enumerate(ranks)),
                                [s for s in range(6) if ranks[s]]))
    assert [(size, sl.tolist(), same) for size, _, sl, same in groups] == [(4, [0, 2], True), (16, [5], True),
                                                                      (64, [1, 3], True)]
    assert [ids.tolist() for _, ids, _, _ in groups] == [[0, 2], [6], [1, 3]]
    pools = lora_pools(6, 24, 40, ranks)
    x, y = torch.randn(7, 24), torch.randn(7, 40)
    expected = ref_add_lora(y, x, *_args(pools), slots)
    with force_plan("gather"):
        cpu_add_lora(y, x, _pages(pools, fill=NAN), DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(y, expected, **FP32_TOL, what="rank groups")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("plan", plans.PLANS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_plan_on_every_pattern(plan, pattern, dtype):
    slots, pools, x, y = _case(17, 8, pattern, 40, 24, dtype, device="cpu", seed=3)
    expected = ref_add_lora(y, x, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    if plan == "grouped":  # the forced plan really runs (it falls back to "gather" where it cannot)
        if not grouped.supported(x):
            pytest.skip(f"F.grouped_mm does not run on this torch for {dtype}")
        assert grouped.lora_ok(x, _pages(pools).a_rows, _pages(pools).b_rows), dtype
    with force_plan(plan):
        cpu_add_lora(y, x, _pages(pools, LAYOUTS[len(pattern) % len(LAYOUTS)]), meta)
    tol = FP32_TOL if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(y, expected, **tol, what=f"forced {plan} {dtype}")


@pytest.mark.parametrize("plan", plans.PLANS)
def test_separate_row_tensors_for_a_and_b(plan):
    # a_rows and b_rows may be two tensors as well as two column ranges of one (only the row index is shared)
    slots = slot_ids(17, 8, "uniform", seed=4, none_fraction=0.2)
    ranks = [RANKS[s % len(RANKS)] for s in range(10)]
    pools = lora_pools(10, 40, 24, ranks, device=DEVICE)
    p = _pages(pools, "scattered")
    pages = LoraPages(p.a_rows.contiguous(), p.b_rows.contiguous(), p.start, p.rank, p.scale, p.max_rank)
    x, y = torch.randn(17, 40, device=DEVICE), torch.randn(17, 24, device=DEVICE)
    expected = ref_add_lora(y, x, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    out = y.clone()
    with force_plan(plan), on("cpu"):
        kernels.add_lora(out, x, pages, meta)
    assert_close(out, expected, **FP32_TOL, what=f"cpu {plan}")
    out = y.clone()
    with on("triton"):
        kernels.add_lora(out, x, pages, meta)
    assert_close(out, expected, **FP32_TOL, what="triton")


@pytest.mark.parametrize("slots", [[4], [2, 2, 2], [0, 3], [1, -1, 0, 0, 2], [-1, 3, -1]])
def test_few_runs_take_the_runs_plan(slots):
    # Up to plans.FEW_RUNS same-slot runs the runs plan beats the grouped plan's fixed cost whatever the run
    # lengths (one request decoding on a delta: one token, one run, at every wrapped layer)
    pools = lora_pools(5, 40, 24, [16, 1, 64, 4, 8])
    x, y = torch.randn(len(slots), 40), torch.randn(len(slots), 24)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    assert choose_plan(meta) == "runs"
    out = y.clone()
    cpu_add_lora(out, x, _pages(pools), meta)
    assert_close(out, ref_add_lora(y, x, *_args(pools), slots), **FP32_TOL, what=f"slots={slots}")


def test_pages_are_checked_once_and_activations_every_call():
    pools = lora_pools(3, 24, 40, [8, 4, 16])
    pages = _pages(pools)
    meta = DeltaKernelMeta.build(slots_tensor([0, 2]))
    x, y = torch.randn(2, 24), torch.randn(2, 40)
    kernels.add_lora(y, x, pages, meta)  # passes: its pages are not checked again for this dtype and width
    with pytest.raises(ValueError, match="x has shape"):
        kernels.add_lora(y, torch.randn(2, 23), pages, meta)  # the activations still are, every call
    with pytest.raises(ValueError, match="meta is for 2 tokens"):
        kernels.add_lora(torch.randn(3, 40), torch.randn(3, 24), pages, meta)
    with pytest.raises(ValueError, match="pages.a_rows .* dtype"):
        kernels.add_lora(y.half(), x.half(), pages, meta)  # another dtype: the pages are checked for that one
    bad = LoraPages(pages.a_rows, pages.b_rows, pages.start, pages.rank[:2], pages.scale, pages.max_rank)
    for _ in range(2):  # a failed check is not remembered as passed
        with pytest.raises(ValueError, match="pages.start"):
            kernels.add_lora(y, x, bad, meta)


def test_checks_after_a_passing_call_still_refuse_bad_activations():
    """The public op takes a short path once a pages object has passed (kernels/_checks.py); a later call with bad
    activations or a meta of another step still gets the full checks' ValueError."""
    pools = lora_pools(2, 24, 24, [4, 4], max_rank=16)
    p = _pages(pools, "packed")
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, -1]))
    with on("cpu"):
        kernels.add_lora(torch.randn(3, 24), torch.randn(3, 24), p, meta)  # passes: p is remembered
        for y, x, m, frag in [
            (torch.randn(3, 24), torch.randn(3, 23), meta, "x has shape [3, 23]"),
            (torch.randn(3, 24), torch.randn(3, 24).half(), meta, "torch.float16"),
            (torch.randn(3, 24), torch.randn(24, 3).t(), meta, "unit stride"),
            (torch.randn(3, 24), torch.randn(3, 24), DeltaKernelMeta.build(slots_tensor([0, 1])), "meta is for 2"),
            (torch.randn(3, 24).double(), torch.randn(3, 24).double(), meta, "torch.float64"),
            (torch.randn(3, 24), torch.randn(3, 24), "meta", "meta must be a DeltaKernelMeta"),
        ]:
            with pytest.raises(ValueError, match=re.escape(frag)):
                kernels.add_lora(y, x, p, m)


def _with_host(p: LoraPages) -> LoraPages:
    """``p`` with live host mirrors of its tables (as the server's layers hand them: kernels.pages.HOST_MIRRORS)."""
    host = {"start": p.start.tolist(), "rank": p.rank.tolist(), "scale": p.scale.tolist()}
    return LoraPages(p.a_rows, p.b_rows, p.start, p.rank, p.scale, p.max_rank, host=host)


@pytest.mark.parametrize("plan", (None,) + plans.PLANS)
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_host_mirrors_give_the_same_result_as_the_tables(plan, num_tokens, pattern):
    """Reading a slot's rank, start and scale from the host mirror (the few-runs fast path and every plan) gives the
    result the device tables give, bit for bit, and the reference's within fp32 rounding."""
    slots, pools, x, y = _case(num_tokens, 6, pattern, 40, 24, torch.float32, device="cpu", seed=5)
    expected = ref_add_lora(y, x, *_args(pools), slots)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    p = _pages(pools, LAYOUTS[num_tokens % len(LAYOUTS)])
    y_tables, y_host = y.clone(), y.clone()
    with force_plan(plan) if plan else contextlib.nullcontext():
        cpu_add_lora(y_tables, x, p, meta)
        cpu_add_lora(y_host, x, _with_host(p), meta)
    assert torch.equal(y_host, y_tables)
    assert_close(y_host, expected, **FP32_TOL, what=f"host mirrors, plan {plan}")
