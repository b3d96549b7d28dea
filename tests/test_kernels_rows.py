"""The row ops (``kernels/rows.py``): BitFit's gathered add and (IA)3's gathered scale, on outputs and on
inputs. The Triton kernels and the CPU backend against the exact float64 reference; both take the sum or
product in fp32 and round once, which is the reference rounded to the dtype, bit for bit. The rows are pages
(``kernels.RowPages``): one row per slot placed anywhere among rows holding NaN."""
from __future__ import annotations

import re

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta, RowPages
from kernels.reference import ref_add_bias, ref_mul_rows
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import BACKENDS, DEVICE, LAYOUTS, PATTERNS, on, row_pages, slot_ids, slots_tensor


def _pages(vec, layout="scattered", seed=0):
    return row_pages(vec, layout=layout, seed=seed, fill=float("nan"))

TRITON_CASES = [(1, 1, "identical"), (3, 3, "distinct"), (17, 8, "uniform"), (64, 8, "zipf"), (64, 3, "skewed")]


def _bias_case(num_tokens, num_deltas, pattern, n_out, dtype, *, seed=0, device=DEVICE):
    slots = slot_ids(num_tokens, num_deltas, pattern, seed=seed, none_fraction=0.2)
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(num_deltas + 2, n_out, generator=g).to(device, dtype)
    y = torch.randn(num_tokens, n_out, generator=g).to(device, dtype)
    return slots, bias, y


def _vec_case(num_tokens, num_deltas, pattern, n, dtype, *, seed=0, device=DEVICE):
    slots = slot_ids(num_tokens, num_deltas, pattern, seed=seed, none_fraction=0.2)
    g = torch.Generator().manual_seed(seed)
    vec = (1.0 + 0.5 * torch.randn(num_deltas + 2, n, generator=g)).to(device, dtype)
    t = torch.randn(num_tokens, n, generator=g).to(device, dtype)
    return slots, vec, t


# --------------------------------------------------------------------------------------- add_bias (BitFit)
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_add_bias_cpu_matches_reference(num_tokens, num_deltas, pattern):
    slots, bias, y = _bias_case(num_tokens, num_deltas, pattern, 40, torch.float32, seed=num_tokens, device="cpu")
    expected = ref_add_bias(y, bias, slots)
    with on("cpu"):
        kernels.add_bias(y, _pages(bias, LAYOUTS[num_deltas % len(LAYOUTS)]), DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(y, expected, atol=1e-6, rtol=1e-6, what=f"slots={slots}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", TRITON_CASES)
def test_add_bias_triton_matches_reference(num_tokens, num_deltas, pattern, dtype):
    n_out = (24, 40, 72)[num_tokens % 3]
    slots, bias, y = _bias_case(num_tokens, num_deltas, pattern, n_out, dtype, seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_add_bias(y, bias, slots).to(dtype)  # exact, rounded once to the dtype
    outs = {}
    for name in BACKENDS:
        outs[name] = y.clone()
        with on(name):
            kernels.add_bias(outs[name], _pages(bias), meta)
        assert_close(outs[name], expected, atol=0.0, rtol=0.0, what=f"{name} {dtype} slots={slots}")
    untouched = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(outs["triton"][untouched], y[untouched])
    assert torch.equal(outs["triton"], outs["cpu"])


def test_add_bias_few_and_many_runs_agree():
    bias = torch.randn(9, 24, device=DEVICE)
    for slots in ([3] * 10 + [-1] * 2 + [5] * 4, [i % 9 if i % 4 else -1 for i in range(40)]):
        y = torch.randn(len(slots), 24, device=DEVICE)
        expected = ref_add_bias(y, bias, slots)
        for name in BACKENDS:
            out = y.clone()
            with on(name):
                kernels.add_bias(out, _pages(bias), DeltaKernelMeta.build(slots_tensor(slots, DEVICE)))
            assert_close(out, expected, **TOLERANCES[torch.float32], what=f"{name} runs")


@pytest.mark.parametrize("name", BACKENDS)
def test_add_bias_bad_input_raises_value_error_naming_argument(name):
    y, bias = torch.randn(4, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    p = _pages(bias)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, -1, 2], DEVICE))
    for kwargs, arg, fragment in [
        (dict(y=y, pages=_pages(torch.randn(3, 25, device=DEVICE)), meta=meta), "pages.rows", "[*, 24]"),
        (dict(y=y, pages=RowPages(p.rows.half(), p.row), meta=meta), "pages.rows", "torch.float16"),
        (dict(y=y, pages=RowPages(p.rows.t().contiguous().t(), p.row), meta=meta), "pages.rows", "unit stride"),
        (dict(y=y, pages=RowPages(p.rows, p.row.long()), meta=meta), "pages.row", "torch.int64"),
        (dict(y=y, pages=bias, meta=meta), "pages", "RowPages"),
        (dict(y=y[:, None], pages=p, meta=meta), "y", "[4, 1, 24]"),
        (dict(y=y.t(), pages=p, meta=meta), "y", "[24, 4]"),
        (dict(y=y, pages=p, meta=DeltaKernelMeta.build(slots_tensor([0], DEVICE))), "meta", "1 tokens"),
    ]:
        with pytest.raises(ValueError, match=arg.replace(".", r"\.")) as info, on(name):
            kernels.add_bias(**kwargs)
        assert fragment in str(info.value), str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 133, 4096])
def test_add_bias_triton_large_on_gpu(num_tokens, dtype):
    slots, bias, y = _bias_case(num_tokens, 32, "zipf", 11008, dtype, seed=1)
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    expected = ref_add_bias(y, bias, slots)
    with on("triton"):
        kernels.add_bias(y, _pages(bias), meta)
    assert_close(y, expected, **TOLERANCES[dtype], what=f"cuda {dtype} T={num_tokens}")


# --------------------------------------------------------------------------------------- mul_rows ((IA)3)
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_mul_rows_cpu_matches_reference(num_tokens, num_deltas, pattern):
    slots, vec, t = _vec_case(num_tokens, num_deltas, pattern, 72, torch.float32, seed=num_tokens, device="cpu")
    expected = ref_mul_rows(t, vec, slots)
    with on("cpu"):
        kernels.mul_rows(t, _pages(vec, LAYOUTS[num_deltas % len(LAYOUTS)]), DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(t, expected, atol=1e-6, rtol=1e-6, what=f"slots={slots}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", TRITON_CASES)
def test_mul_rows_triton_matches_reference(num_tokens, num_deltas, pattern, dtype):
    n = (24, 40, 72)[num_tokens % 3]
    slots, vec, t = _vec_case(num_tokens, num_deltas, pattern, n, dtype, seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_mul_rows(t, vec, slots).to(dtype)  # one fp32 product, one rounding: exact
    outs = {}
    for name in BACKENDS:
        outs[name] = t.clone()
        with on(name):
            kernels.mul_rows(outs[name], _pages(vec), meta)
        assert_close(outs[name], expected, atol=0.0, rtol=0.0, what=f"{name} {dtype} slots={slots}")
    assert torch.equal(outs["triton"], outs["cpu"])


def test_mul_rows_input_and_output_variants_compose_like_peft():
    # PEFT (IA)3: k/v scale the base *output*, the feed-forward down projection scales its *input*:
    # base(x * l_in) * l_out, per token's slot.
    slots = [0, 1, -1, 1, 2]
    w = torch.randn(40, 24, device=DEVICE)
    l_in, l_out = 1 + torch.rand(3, 24, device=DEVICE), 1 + torch.rand(3, 40, device=DEVICE)
    x = torch.randn(5, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for name in BACKENDS:
        x_in = x.clone()
        with on(name):
            kernels.mul_rows(x_in, _pages(l_in), meta)
            y = x_in @ w.T
            kernels.mul_rows(y, _pages(l_out), meta)
        for i, s in enumerate(slots):
            want = x[i] @ w.T if s < 0 else ((x[i] * l_in[s]) @ w.T) * l_out[s]
            assert_close(y[i], want, **TOLERANCES[torch.float32], what=f"{name} token {i}")


@pytest.mark.parametrize("name", BACKENDS)
def test_mul_rows_bad_input_raises_value_error_naming_argument(name):
    t, vec = torch.randn(4, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    p = _pages(vec)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, -1, 2], DEVICE))
    for kwargs, arg, fragment in [
        (dict(t=t, pages=_pages(torch.randn(3, 12, device=DEVICE)), meta=meta), "pages.rows", "[*, 24]"),
        (dict(t=t.half(), pages=p, meta=meta), "pages.rows", "expected torch.float16"),
        (dict(t=t.long(), pages=p, meta=meta), "t", "torch.int64"),
        (dict(t=t, pages=p, meta="slots"), "meta", "str"),
    ]:
        with pytest.raises(ValueError, match=arg.replace(".", r"\.")) as info, on(name):
            kernels.mul_rows(**kwargs)
        assert fragment in str(info.value), str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 133, 4096])
def test_mul_rows_triton_large_on_gpu(num_tokens, dtype):
    slots, vec, t = _vec_case(num_tokens, 32, "uniform", 4096, dtype, seed=2)
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    expected = ref_mul_rows(t, vec, slots)
    with on("triton"):
        kernels.mul_rows(t, _pages(vec), meta)
    assert_close(t, expected, **TOLERANCES[dtype], what=f"cuda {dtype} T={num_tokens}")


@pytest.mark.parametrize("num_tokens", [1, 17, 64])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_row_ops_on_a_restricted_meta_touch_only_those_slots(num_tokens, pattern):
    # A layer whose bias (or (IA)3 vector) only some of the step's slots have passes meta.restrict(those): the
    # other slots' tokens are left exactly as they were (no zero rows added, no ones multiplied).
    slots, bias, y = _bias_case(num_tokens, 5, pattern, 40, torch.float32, seed=num_tokens, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    keep = frozenset(meta.active_slots_host[1::2])
    masked = [s if s in keep else -1 for s in slots]
    untouched = [i for i, s in enumerate(masked) if s < 0]
    for name in BACKENDS:
        for op, ref in ((kernels.add_bias, ref_add_bias), (kernels.mul_rows, ref_mul_rows)):
            out = y.clone()
            with on(name):
                op(out, _pages(bias), meta.restrict(keep))
            assert_close(out, ref(y, bias, masked), atol=1e-6, rtol=1e-6, what=f"{name} {op.__name__} {slots}")
            assert torch.equal(out[untouched], y[untouched]), (name, op.__name__)


@pytest.mark.parametrize("op", ["add_bias", "mul_rows"])
def test_checks_after_a_passing_call_still_refuse_bad_activations(op):
    """The short check path once pages have passed (kernels/_checks.py) still refuses a bad tensor or meta."""
    slots, vec, t = _vec_case(5, 3, "uniform", 24, torch.float32, device="cpu")
    pages, meta, fn = _pages(vec), DeltaKernelMeta.build(slots_tensor(slots)), getattr(kernels, op)
    with on("cpu"):
        fn(t, pages, meta)  # passes: the pages are remembered
        for bad, m, frag in [(torch.randn(5, 23), meta, "pages.rows"), (torch.randn(4, 24), meta, "meta is for 5"),
                             (torch.randn(24, 5).t(), meta, "unit stride"), (t.double(), meta, "torch.float64"),
                             (t, "meta", "meta must be a DeltaKernelMeta")]:
            with pytest.raises(ValueError, match=re.escape(frag)):
                fn(bad, pages, m)
