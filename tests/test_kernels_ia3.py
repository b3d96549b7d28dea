"""(IA)³ row scaling, on outputs and on inputs: Triton against the reference, the reference against a
float64 loop."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta, ia3, reference
from tests.helpers import TOLERANCES, assert_close
from tests.test_kernels_cases import PATTERNS, loop_rows, slot_ids, slots_tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(num_tokens, num_deltas, pattern, n, dtype, *, seed=0, device=DEVICE):
    slots = slot_ids(num_tokens, num_deltas, pattern, seed=seed, none_fraction=0.2)
    g = torch.Generator().manual_seed(seed)
    vec = (1.0 + 0.5 * torch.randn(num_deltas + 2, n, generator=g)).to(device, dtype)
    t = torch.randn(num_tokens, n, generator=g).to(device, dtype)
    return slots, vec, t


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_float64_loop(num_tokens, num_deltas, pattern):
    slots, vec, t = _case(num_tokens, num_deltas, pattern, 72, torch.float32, seed=num_tokens, device="cpu")
    expected = loop_rows(t, vec, slots, multiply=True)
    reference.mul_rows(t, vec, DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(t, expected, atol=1e-6, rtol=1e-6, what=f"slots={slots}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", [(1, 1, "identical"), (3, 3, "distinct"),
                                                             (17, 8, "uniform"), (64, 8, "zipf"), (64, 3, "skewed")])
def test_triton_matches_reference(num_tokens, num_deltas, pattern, dtype):
    n = (24, 40, 72)[num_tokens % 3]
    slots, vec, t = _case(num_tokens, num_deltas, pattern, n, dtype, seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    t_ref = t.clone()
    reference.mul_rows(t_ref, vec, meta)
    ia3.mul_rows(t, vec, meta)
    assert_close(t, t_ref, atol=0.0, rtol=0.0, what=f"{dtype} slots={slots}")  # one fp32 product, one rounding


def test_input_and_output_variants_compose_like_peft():
    # PEFT (IA)3: k/v scale the base *output*, the feed-forward down projection scales its *input*:
    # base(x * l_in) * l_out, per token's slot.
    slots = [0, 1, -1, 1, 2]
    w = torch.randn(40, 24, device=DEVICE)
    l_in, l_out = 1 + torch.rand(3, 24, device=DEVICE), 1 + torch.rand(3, 40, device=DEVICE)
    x = torch.randn(5, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for fn in (reference.mul_rows, ia3.mul_rows, kernels.mul_rows):
        x_in = x.clone()
        fn(x_in, l_in, meta)
        y = x_in @ w.T
        fn(y, l_out, meta)
        for i, s in enumerate(slots):
            want = x[i] @ w.T if s < 0 else ((x[i] * l_in[s]) @ w.T) * l_out[s]
            assert_close(y[i], want, **TOLERANCES[torch.float32], what=f"{fn.__module__} token {i}")


@pytest.mark.parametrize("fn", [ia3.mul_rows, kernels.mul_rows], ids=["launcher", "dispatch"])
def test_bad_input_raises_value_error_naming_argument(fn):
    t, vec = torch.randn(4, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, -1, 2], DEVICE))
    for kwargs, name, fragment in [
        (dict(t=t, vec=torch.randn(3, 12, device=DEVICE), meta=meta), "vec", "[3, 12]"),
        (dict(t=t.half(), vec=vec, meta=meta), "vec", "expected torch.float16"),
        (dict(t=t.long(), vec=vec, meta=meta), "t", "torch.int64"),
        (dict(t=t, vec=vec, meta="slots"), "meta", "str"),
    ]:
        with pytest.raises(ValueError, match=name) as info:
            fn(**kwargs)
        assert fragment in str(info.value), str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 133, 4096])
def test_triton_large_on_gpu(num_tokens, dtype):
    slots, vec, t = _case(num_tokens, 32, "uniform", 4096, dtype, seed=2)
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    t_ref = t.clone()
    reference.mul_rows(t_ref, vec, meta)
    ia3.mul_rows(t, vec, meta)
    assert_close(t, t_ref, **TOLERANCES[dtype], what=f"cuda {dtype} T={num_tokens}")
