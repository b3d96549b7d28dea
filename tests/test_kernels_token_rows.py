"""``kernels.replace_rows`` and ``kernels.head_rows`` (trainable tokens): the Triton kernels and the CPU backend
against the exact float64 reference, over odd sizes, popularity patterns, slots with 0..R replaced ids and
ids that miss; tokens whose id is not replaced (and base tokens) keep the base row bit for bit. The ops read paged
runs (``kernels.TokenPages``: rows and ids placed packed, scattered or in fragmented regions, independently);
the reference reads the dense [S, R] pools."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta
from kernels.reference import ref_head_rows, ref_replace_rows
from tests.helpers import TOLERANCES, assert_close
from kernels import TokenPages
from tests.kernel_cases import BACKENDS, DEVICE, LAYOUTS, PATTERNS, on, slot_ids, slots_tensor, token_pages

VOCAB = 50
TRITON_CASES = [(1, 1, "identical"), (3, 3, "distinct"), (17, 8, "uniform"), (64, 8, "zipf"), (64, 3, "skewed")]


def _pools(num_slots, max_rows, hidden, dtype, device, seed):
    """index [S, R] (distinct ids per slot, -1 past count; slot s holds s % (R + 1) ids), values, count."""
    g = torch.Generator().manual_seed(seed)
    counts = [s % (max_rows + 1) for s in range(num_slots)]
    index = torch.full((num_slots, max_rows), -1, dtype=torch.int64)
    for s, c in enumerate(counts):
        index[s, :c] = torch.randperm(VOCAB, generator=g)[:c]
    values = torch.randn(num_slots, max_rows, hidden, generator=g)
    values[index < 0] = 1e3  # garbage past count: a kernel that reads it fails loudly
    return (index.to(device), values.to(device, dtype),
            torch.tensor(counts, dtype=torch.int32, device=device))


def _replace_case(num_tokens, num_deltas, pattern, hidden, dtype, *, max_rows=5, seed=0, device=DEVICE):
    slots = slot_ids(num_tokens, num_deltas, pattern, seed=seed, none_fraction=0.2)
    index, values, count = _pools(num_deltas + 2, max_rows, hidden, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, VOCAB, (num_tokens,), generator=g)
    for t, s in enumerate(slots):  # make about half the tokens of slots with rows hit one of them
        c = int(count[s]) if s >= 0 else 0
        if c and t % 2:
            ids[t] = index[s, t % c]
    y = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
    return slots, ids.to(device), index, values, count, y


def _replaced(slots, ids, index, count):
    return [t for t, s in enumerate(slots)
            if s >= 0 and int(ids[t]) in index[s, :int(count[s])].tolist()]


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_replace_rows_cpu_matches_reference(num_tokens, num_deltas, pattern):
    slots, ids, index, values, count, y = _replace_case(num_tokens, num_deltas, pattern, 24, torch.float32,
                                                        seed=num_tokens, device="cpu")
    expected = ref_replace_rows(y, ids, index, values, count, slots)
    out = y.clone()
    with on("cpu"):
        pages = token_pages(index, values, count, layout=LAYOUTS[num_tokens % len(LAYOUTS)], seed=num_deltas)
        kernels.replace_rows(out, ids, pages, DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(out, expected, atol=0.0, rtol=0.0, what=f"slots={slots}")
    hit = set(_replaced(slots, ids, index, count))
    keep = [t for t in range(num_tokens) if t not in hit]
    assert torch.equal(out[keep], y[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", TRITON_CASES)
@pytest.mark.parametrize("max_rows", [1, 5, 70])
def test_replace_rows_triton_and_cpu_match_reference(num_tokens, num_deltas, pattern, dtype, max_rows):
    hidden = (24, 40, 72)[num_tokens % 3]
    slots, ids, index, values, count, y = _replace_case(num_tokens, num_deltas, pattern, hidden, dtype,
                                                        max_rows=min(max_rows, VOCAB), seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_replace_rows(y, ids, index, values, count, slots).to(dtype)  # a copy: exact
    pages = token_pages(index, values, count, layout=LAYOUTS[num_tokens % len(LAYOUTS)])
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.replace_rows(out, ids, pages, meta)
        assert_close(out, expected, atol=0.0, rtol=0.0, what=f"{name} {dtype} R={max_rows} slots={slots}")


def _head_case(num_tokens, num_deltas, pattern, hidden, dtype, *, max_rows=5, seed=0, device=DEVICE):
    slots = slot_ids(num_tokens, num_deltas, pattern, seed=seed, none_fraction=0.2)
    index, values, count = _pools(num_deltas + 2, max_rows, hidden, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 9)
    h = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
    logits = torch.randn(num_tokens, VOCAB, generator=g).to(device, dtype)
    return slots, h, index, values, count, logits


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_head_rows_cpu_matches_reference(num_tokens, num_deltas, pattern):
    slots, h, index, values, count, logits = _head_case(num_tokens, num_deltas, pattern, 24, torch.float32,
                                                        seed=num_tokens, device="cpu")
    expected = ref_head_rows(logits, h, index, values, count, slots)
    out = logits.clone()
    with on("cpu"):
        pages = token_pages(index, values, count, layout=LAYOUTS[num_tokens % len(LAYOUTS)], seed=num_deltas)
        kernels.head_rows(out, h, pages, DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"slots={slots}")
    changed = torch.zeros_like(out, dtype=torch.bool)
    for t, s in enumerate(slots):
        if s >= 0:
            changed[t, index[s, :int(count[s])]] = True
    assert torch.equal(out[~changed], logits[~changed]), "a logit outside the replaced ids changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", TRITON_CASES)
@pytest.mark.parametrize("max_rows", [1, 5, 20])
def test_head_rows_triton_and_cpu_match_reference(num_tokens, num_deltas, pattern, dtype, max_rows):
    hidden = (24, 40, 72)[num_tokens % 3]
    slots, h, index, values, count, logits = _head_case(num_tokens, num_deltas, pattern, hidden, dtype,
                                                        max_rows=max_rows, seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_head_rows(logits, h, index, values, count, slots)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else TOLERANCES[dtype]
    pages = token_pages(index, values, count, layout=LAYOUTS[num_tokens % len(LAYOUTS)])
    for name in BACKENDS:
        out = logits.clone()
        with on(name):
            kernels.head_rows(out, h, pages, meta)
        assert_close(out, expected, **tol, what=f"{name} {dtype} R={max_rows} slots={slots}")


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_raises_value_error_naming_argument(name):
    y, ids = torch.randn(4, 24, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE)
    index, values, count = _pools(3, 5, 24, torch.float32, DEVICE, 0)
    good = token_pages(index, values, count)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, -1, 2], DEVICE))

    def pages(**change):
        fields = dict(values=good.values, ids=good.ids, start=good.start, id_start=good.id_start, count=good.count,
                      max_count=good.max_count)
        return TokenPages(**{**fields, **change})

    for args, arg, fragment in [
        ((y, ids.int(), good), "ids", "torch.int32"),
        ((y, ids, pages(ids=good.ids.int())), "pages.ids", "torch.int32"),
        ((y, ids, pages(values=good.values[:, :20])), "pages.values", "[*, 24]"),
        ((y, ids, pages(values=good.values.half())), "pages.values", "float16"),
        ((y, ids, pages(count=good.count.long())), "pages.count", "torch.int64"),
        ((y, ids, pages(id_start=good.id_start[:2])), "pages.id_start", "[2]"),
        ((y, ids, pages(max_count=-1)), "pages.max_count", "-1"),
        ((y, ids, values), "pages", "TokenPages"),
    ]:
        with pytest.raises(ValueError, match=arg) as info, on(name):
            kernels.replace_rows(*args, meta)
        assert fragment in str(info.value), str(info.value)
    logits = torch.randn(4, VOCAB, device=DEVICE)
    with pytest.raises(ValueError, match="h") as info, on(name):
        kernels.head_rows(logits, y[:3], good, meta)
    assert "[3, 24]" in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_rows_large_on_gpu(dtype):
    slots, ids, index, values, count, y = _replace_case(4096, 32, "zipf", 4096, dtype, max_rows=20, seed=3,
                                                        device="cuda")
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    expected = ref_replace_rows(y, ids, index, values, count, slots)
    with on("triton"):
        kernels.replace_rows(y, ids, token_pages(index, values, count, layout="regions"), meta)
    assert_close(y, expected, atol=0.0, rtol=0.0, what=f"replace {dtype}")
    slots, h, index, values, count, logits = _head_case(133, 32, "uniform", 4096, dtype, max_rows=20, seed=4,
                                                        device="cuda")
    expected = ref_head_rows(logits, h, index, values, count, slots)
    with on("triton"):
        kernels.head_rows(logits, h, token_pages(index, values, count, layout="regions"),
                          DeltaKernelMeta.build(slots_tensor(slots, "cuda")))
    assert_close(logits, expected, **TOLERANCES[dtype], what=f"head {dtype}")
