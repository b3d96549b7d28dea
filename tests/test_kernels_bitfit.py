"""BitFit gathered add: Triton against the reference, the reference against a float64 loop."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta, bitfit, reference
from tests.helpers import TOLERANCES, assert_close
from tests.test_kernels_cases import PATTERNS, loop_rows, slot_ids, slots_tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(num_tokens, num_deltas, pattern, n_out, dtype, *, seed=0, device=DEVICE):
    slots = slot_ids(num_tokens, num_deltas, pattern, seed=seed, none_fraction=0.2)
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(num_deltas + 2, n_out, generator=g).to(device, dtype)
    y = torch.randn(num_tokens, n_out, generator=g).to(device, dtype)
    return slots, bias, y


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_float64_loop(num_tokens, num_deltas, pattern):
    slots, bias, y = _case(num_tokens, num_deltas, pattern, 40, torch.float32, seed=num_tokens, device="cpu")
    expected = loop_rows(y, bias, slots, multiply=False)
    reference.add_bias(y, bias, DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(y, expected, atol=1e-6, rtol=1e-6, what=f"slots={slots}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", [(1, 1, "identical"), (3, 3, "distinct"),
                                                             (17, 8, "uniform"), (64, 8, "zipf"), (64, 3, "skewed")])
def test_triton_matches_reference(num_tokens, num_deltas, pattern, dtype):
    n_out = (24, 40, 72)[num_tokens % 3]
    slots, bias, y = _case(num_tokens, num_deltas, pattern, n_out, dtype, seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    y_ref = y.clone()
    reference.add_bias(y_ref, bias, meta)
    bitfit.add_bias(y, bias, meta)
    # Both add in fp32 and round once, so even fp16 agrees to the bit.
    assert_close(y, y_ref, atol=0.0, rtol=0.0, what=f"{dtype} slots={slots}")
    untouched = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(y[untouched], y_ref[untouched])


def test_few_and_many_runs_agree():
    bias = torch.randn(9, 24, device=DEVICE)
    for slots in ([3] * 10 + [-1] * 2 + [5] * 4, [i % 9 if i % 4 else -1 for i in range(40)]):
        y = torch.randn(len(slots), 24, device=DEVICE)
        expected = loop_rows(y, bias, slots, multiply=False)
        for fn in (reference.add_bias, bitfit.add_bias, kernels.add_bias):
            out = y.clone()
            fn(out, bias, DeltaKernelMeta.build(slots_tensor(slots, DEVICE)))
            assert_close(out, expected, **TOLERANCES[torch.float32], what=f"{fn.__module__} runs")


@pytest.mark.parametrize("fn", [bitfit.add_bias, kernels.add_bias], ids=["launcher", "dispatch"])
def test_bad_input_raises_value_error_naming_argument(fn):
    y, bias = torch.randn(4, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, -1, 2], DEVICE))
    for kwargs, name, fragment in [
        (dict(y=y, bias=torch.randn(3, 25, device=DEVICE), meta=meta), "bias", "[3, 25]"),
        (dict(y=y, bias=bias.half(), meta=meta), "bias", "torch.float16"),
        (dict(y=y, bias=bias.t().contiguous().t(), meta=meta), "bias", "contiguous"),
        (dict(y=y[:, None], bias=bias, meta=meta), "y", "[4, 1, 24]"),
        (dict(y=y.t(), bias=bias, meta=meta), "y", "[24, 4]"),
        (dict(y=y, bias=bias, meta=DeltaKernelMeta.build(slots_tensor([0], DEVICE))), "meta", "1 tokens"),
    ]:
        with pytest.raises(ValueError, match=name) as info:
            fn(**kwargs)
        assert fragment in str(info.value), str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 133, 4096])
def test_triton_large_on_gpu(num_tokens, dtype):
    slots, bias, y = _case(num_tokens, 32, "zipf", 11008, dtype, seed=1)
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    y_ref = y.clone()
    reference.add_bias(y_ref, bias, meta)
    bitfit.add_bias(y, bias, meta)
    assert_close(y, y_ref, **TOLERANCES[dtype], what=f"cuda {dtype} T={num_tokens}")
