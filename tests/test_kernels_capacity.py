"""Capacity-mode launches (``DeltaKernelMeta.build(..., capacity=True)``, what a captured CUDA graph replays):
grids sized by the buffers' capacity, programs exiting on the device-side active-slot count and segment
lengths. Every Triton op gives the same output through a capacity meta as through today's per-step grids and
matches the float64 reference, over popularity patterns, odd sizes, bucket padding (-1 tokens past the step's
own) and buffers whose unused tails hold stale values of earlier, larger steps and out-of-range garbage. The
launch a capacity meta describes depends on the token count and the buffers only, not on the step's slots."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import ACT_CODES, DeltaKernelMeta, MetaBuffers
from kernels.reference import (ref_add_bias, ref_add_bottleneck, ref_add_lora, ref_head_rows, ref_mul_rows,
                               ref_replace_rows, ref_scale_shift_rows)
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import (DEVICE, FP32_TOL, PATTERNS, adapter_pages, bottleneck_pools, dense_bottleneck,
                                dense_lora, dense_rows, lora_pages, lora_pools, on, row_pages, scale_shift_pages,
                                slot_ids, slots_tensor, token_pages)

MAX_SLOTS = 6
POOL = MAX_SLOTS + 2  # slot ids 0..7; a step uses at most MAX_SLOTS of them
# (step tokens, bucket, deltas, pattern): odd sizes, buckets with -1 padding, one to every slot
CASES = [(1, 1, 1, "identical"), (3, 4, 3, "distinct"), (7, 8, 5, "zipf"), (13, 16, 6, "uniform"),
         (20, 32, 4, "skewed"), (9, 9, 2, "identical")]
N_IN, N_OUT = 40, 24


def _stale(buffers: MetaBuffers) -> None:
    """Fill the buffers with an earlier, larger step, then write out-of-range garbage over every tail a view
    of the next step will not cover: a launch that reads a tail indexes far outside the pages and fails."""
    big = [s % MAX_SLOTS for s in range(buffers.max_tokens)]
    DeltaKernelMeta.build(slots_tensor(big, DEVICE), big, buffers=buffers)


def _garbage_tails(meta: DeltaKernelMeta, buffers: MetaBuffers) -> None:
    t, s = buffers.max_tokens, buffers.max_slots
    st = buffers.storage
    n, a = meta.num_tokens, meta.num_active
    st[n:t] = 1 << 20  # sorted_token_ids past the step's tokens
    st[t + a:t + s] = 1 << 20  # active slots past A: a slot id no table has
    st[t + s + a + 1:t + 2 * s + 1] = -(1 << 20)  # seg_start past A + 1
    st[t + 2 * s + 1 + a:t + 3 * s + 1] = 1 << 20  # seg_len past A


def _metas(num_tokens: int, bucket: int, num_deltas: int, pattern: str, seed: int):
    """(slots of the bucket, ordinary meta, capacity meta) of one step padded with -1 up to ``bucket`` tokens."""
    step = slot_ids(num_tokens, num_deltas, pattern, pool_slots=POOL, seed=seed, none_fraction=0.2)
    slots = step + [-1] * (bucket - num_tokens)
    plain = DeltaKernelMeta.build(slots_tensor(slots, DEVICE), slots)
    buffers = MetaBuffers(max_tokens=32, max_slots=MAX_SLOTS, device=DEVICE)
    _stale(buffers)
    cap = DeltaKernelMeta.build(slots_tensor(slots, DEVICE), slots, buffers=buffers, capacity=True)
    _garbage_tails(cap, buffers)
    assert cap.capacity and (cap.grid_tokens, cap.grid_slots) == (bucket, MAX_SLOTS)
    assert int(cap.num_active_dev) == plain.num_active
    return slots, plain, cap


def _same(a: torch.Tensor, b: torch.Tensor, what: str, tol: dict = FP32_TOL) -> None:
    """Capacity vs today's grid, within fp32 rounding. In the interpreter both run the same tiles in K, but numpy's
    BLAS may sum a tile product in another order for another M (OpenBLAS' Haswell kernels on an AMD EPYC host: 3 of
    768 elements 4.5e-8 apart for a 32-token bucket against 20 tokens); on CUDA the autotuner keys on M_HINT (the
    bucket vs the longest segment) and may pick another K tile."""
    assert_close(b, a, **tol, what=f"capacity vs today's grid: {what}")


def _both(op, out0: torch.Tensor, plain, cap) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = out0.clone(), out0.clone()
    with on("triton"):
        op(a, plain)
        op(b, cap)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, bucket, num_deltas, pattern", CASES)
def test_lora_capacity_equals_todays_grid_and_the_reference(num_tokens, bucket, num_deltas, pattern, dtype):
    slots, plain, cap = _metas(num_tokens, bucket, num_deltas, pattern, seed=num_tokens)
    ranks = [(1, 4, 16, 0, 64, 8, 3, 20)[s] for s in range(POOL)]
    pools = lora_pools(POOL, N_IN, N_OUT, ranks, device=DEVICE, seed=bucket, dtype=dtype)
    pages = lora_pages(pools, layout="regions", fill=float("nan"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(bucket, N_IN, generator=g).to(DEVICE, dtype)
    y0 = torch.randn(bucket, N_OUT, generator=g).to(DEVICE, dtype)
    a, b = _both(lambda y, m: kernels.add_lora(y, x, pages, m), y0, plain, cap)
    tol = FP32_TOL if dtype == torch.float32 else TOLERANCES[dtype]
    _same(a, b, str(slots), tol)
    la, lb = dense_lora(pages)
    assert_close(b, ref_add_lora(y0, x, la, lb, pages.scale, pages.rank, slots), **tol, what=f"{dtype} {slots}")
    assert torch.equal(b[num_tokens:], y0[num_tokens:])  # the bucket's padding rows stay as they were


@pytest.mark.parametrize("num_tokens, bucket, num_deltas, pattern", CASES)
def test_bottleneck_capacity_equals_todays_grid_and_the_reference(num_tokens, bucket, num_deltas, pattern):
    slots, plain, cap = _metas(num_tokens, bucket, num_deltas, pattern, seed=num_tokens + 1)
    widths = [(8, 0, 16, 3, 32, 1, 5, 12)[s] for s in range(POOL)]
    acts = [list(ACT_CODES.values())[s % 4] for s in range(POOL)]
    pools = bottleneck_pools(POOL, N_OUT, widths, acts, device=DEVICE, seed=bucket)
    pages = adapter_pages(pools, layout="reversed", fill=float("nan"))
    u = torch.randn(bucket, N_OUT, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y0 = torch.randn(bucket, N_OUT, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    a, b = _both(lambda y, m: kernels.add_bottleneck(y, u, pages, m), y0, plain, cap)
    _same(a, b, str(slots))
    d = dense_bottleneck(pages)
    expected = ref_add_bottleneck(y0, u, d["down"], d["down_bias"], d["up"], d["up_bias"], d["scale"], d["width"],
                                  d["act"], slots)
    assert_close(b, expected, **FP32_TOL, what=str(slots))


@pytest.mark.parametrize("num_tokens, bucket, num_deltas, pattern", CASES)
def test_row_ops_capacity_equal_todays_and_the_reference(num_tokens, bucket, num_deltas, pattern):
    slots, plain, cap = _metas(num_tokens, bucket, num_deltas, pattern, seed=num_tokens + 2)
    g = torch.Generator().manual_seed(6)
    vec = (1 + 0.3 * torch.randn(POOL, N_OUT, generator=g)).to(DEVICE)
    pages = row_pages(vec, layout="scattered", fill=float("nan"))
    y0 = torch.randn(bucket, N_OUT, generator=g).to(DEVICE)
    for op, ref in ((kernels.add_bias, ref_add_bias), (kernels.mul_rows, ref_mul_rows)):
        a, b = _both(lambda y, m: op(y, pages, m), y0, plain, cap)
        assert torch.equal(a, b), f"{op.__name__}: slots={slots}"
        assert_close(b, ref(y0, dense_rows(pages), slots), atol=1e-6, rtol=1e-6, what=f"{op.__name__} {slots}")


@pytest.mark.parametrize("num_tokens, bucket, num_deltas, pattern", CASES)
def test_scale_shift_capacity_equals_todays_and_the_reference(num_tokens, bucket, num_deltas, pattern):
    slots, plain, cap = _metas(num_tokens, bucket, num_deltas, pattern, seed=num_tokens + 3)
    g = torch.Generator().manual_seed(7)
    scale = (1 + 0.2 * torch.randn(POOL, N_OUT, generator=g)).to(DEVICE)
    shift = torch.randn(POOL, N_OUT, generator=g).to(DEVICE)
    flag = torch.tensor([s % 3 != 1 for s in range(POOL)], dtype=torch.int32).to(DEVICE)
    pages = scale_shift_pages(scale, shift, flag, fill=float("nan"))
    y0 = torch.randn(bucket, N_OUT, generator=g).to(DEVICE)
    a, b = _both(lambda y, m: kernels.scale_shift_rows(y, pages, m), y0, plain, cap)
    assert torch.equal(a, b), f"slots={slots}"
    assert_close(b, ref_scale_shift_rows(y0, scale, shift, flag, slots), atol=1e-5, rtol=1e-5, what=str(slots))


@pytest.mark.parametrize("num_tokens, bucket, num_deltas, pattern", CASES[1:5])
def test_token_rows_capacity_equal_todays_and_the_reference(num_tokens, bucket, num_deltas, pattern):
    slots, plain, cap = _metas(num_tokens, bucket, num_deltas, pattern, seed=num_tokens + 4)
    vocab, hidden, max_rows = 50, 24, 5
    g = torch.Generator().manual_seed(8)
    counts = [s % (max_rows + 1) for s in range(POOL)]
    index = torch.full((POOL, max_rows), -1, dtype=torch.int64)
    for s, c in enumerate(counts):
        index[s, :c] = torch.randperm(vocab, generator=g)[:c]
    ids = torch.tensor([int(index[s, t % counts[s]]) if s >= 0 and counts[s] and t % 2 else t % vocab
                        for t, s in enumerate(slots)], dtype=torch.int64).to(DEVICE)
    index, values = index.to(DEVICE), torch.randn(POOL, max_rows, hidden, generator=g).to(DEVICE)
    count = torch.tensor(counts, dtype=torch.int32).to(DEVICE)
    pages = token_pages(index, values, count)
    y0 = torch.randn(bucket, hidden, generator=g).to(DEVICE)
    a, b = _both(lambda y, m: kernels.replace_rows(y, ids, pages, m), y0, plain, cap)
    assert torch.equal(a, b) and torch.equal(b.cpu(), ref_replace_rows(y0, ids, index, values, count, slots).float().cpu())
    h = torch.randn(bucket, hidden, generator=g).to(DEVICE)
    logits0 = torch.randn(bucket, vocab, generator=g).to(DEVICE)
    a, b = _both(lambda lg, m: kernels.head_rows(lg, h, pages, m), logits0, plain, cap)
    _same(a, b, str(slots))
    assert_close(b, ref_head_rows(logits0, h, index, values, count, slots), atol=1e-5, rtol=1e-5, what=str(slots))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_capacity_launch_depends_on_the_bucket_only(pattern):
    """Two steps of one bucket, different slots: the same grid extents and the same addresses of every tensor a
    launch reads (what a captured graph holds), different device-side counts."""
    buffers = MetaBuffers(max_tokens=16, max_slots=MAX_SLOTS, device=DEVICE)
    seen = []
    for seed, n in ((0, 5), (1, 8), (2, 1)):
        slots = slot_ids(n, min(n, 4), pattern, pool_slots=POOL, seed=seed) + [-1] * (8 - n)
        meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE), slots, buffers=buffers, capacity=True)
        seen.append(((meta.grid_tokens, meta.grid_slots),
                     tuple(t.data_ptr() for t in (meta.sorted_token_ids, meta.active_slots, meta.seg_start,
                                                  meta.num_active_dev)), int(meta.num_active_dev)))
    assert len({s[0] for s in seen}) == 1 and len({s[1] for s in seen}) == 1
    assert [s[2] for s in seen] == [len({x for x in slot_ids(n, min(n, 4), pattern, pool_slots=POOL, seed=sd)})
                                    for sd, n in ((0, 5), (1, 8), (2, 1))]


def test_a_capacity_meta_with_no_delta_token_still_launches_and_changes_nothing():
    """A step with every token at -1 through a capacity meta: not skippable (a graph captured on it must serve
    later steps), and the launches leave every row as it was."""
    buffers = MetaBuffers(max_tokens=8, max_slots=MAX_SLOTS, device=DEVICE)
    _stale(buffers)
    slots = [-1] * 8
    cap = DeltaKernelMeta.build(slots_tensor(slots, DEVICE), slots, buffers=buffers, capacity=True)
    assert cap.no_delta and not cap.skippable and int(cap.num_active_dev) == 0
    pools = lora_pools(POOL, N_IN, N_OUT, [4] * POOL, device=DEVICE)
    pages = lora_pages(pools)
    x = torch.randn(8, N_IN).to(DEVICE)
    y0 = torch.randn(8, N_OUT).to(DEVICE)
    y = y0.clone()
    with on("triton"):
        kernels.add_lora(y, x, pages, cap)
    assert torch.equal(y, y0)


def test_capacity_needs_buffers():
    with pytest.raises(ValueError, match="capacity=True needs buffers"):
        DeltaKernelMeta.build(slots_tensor([0, 1]), [0, 1], capacity=True)
