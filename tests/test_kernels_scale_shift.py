"""``kernels.scale_shift_rows`` (DoRA's column scale): the Triton kernel and the CPU backend against the exact
float64 reference, over odd sizes, popularity patterns and runs; tokens of unflagged slots (plain LoRA or
other kinds in the same batch) and base tokens must come out bit for bit as they went in. The ops read paged
rows (``kernels.ScaleShiftPages``) placed packed, scattered or in fragmented regions; the reference reads the
dense [S, n] tables."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta
from kernels.reference import ref_scale_shift_rows
from tests.helpers import TOLERANCES, assert_close
from kernels import ScaleShiftPages
from tests.kernel_cases import (BACKENDS, DEVICE, LAYOUTS, PATTERNS, on, scale_shift_pages, slot_ids,
                                slots_tensor)

TRITON_CASES = [(1, 1, "identical"), (3, 3, "distinct"), (17, 8, "uniform"), (64, 8, "zipf"), (64, 3, "skewed"),
                (130, 5, "uniform")]


def _case(num_tokens, num_deltas, pattern, n, dtype, *, seed=0, device=DEVICE, flagged=None):
    """Slots from ``pattern`` (20% base tokens); every other slot id flagged (DoRA) unless ``flagged`` says."""
    slots = slot_ids(num_tokens, num_deltas, pattern, seed=seed, none_fraction=0.2)
    g = torch.Generator().manual_seed(seed)
    num_slots = num_deltas + 2
    scale = (1.0 + 0.3 * torch.randn(num_slots, n, generator=g)).to(device)  # fp32 [S, n]
    shift = (0.2 * torch.randn(num_slots, n, generator=g)).to(device)  # fp32 [S, n]
    flags = [s % 2 for s in range(num_slots)] if flagged is None else flagged
    flag = torch.tensor(flags, dtype=torch.int32, device=device)
    y = torch.randn(num_tokens, n, generator=g).to(device, dtype)
    return slots, scale, shift, flag, y


def _untouched(slots, flag):
    return [i for i, s in enumerate(slots) if s < 0 or not int(flag[s])]


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_deltas", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_matches_reference(num_tokens, num_deltas, pattern):
    slots, scale, shift, flag, y = _case(num_tokens, num_deltas, pattern, 40, torch.float32, seed=num_tokens,
                                         device="cpu")
    expected = ref_scale_shift_rows(y, scale, shift, flag, slots)
    out = y.clone()
    with on("cpu"):
        pages = scale_shift_pages(scale, shift, flag, layout=LAYOUTS[num_tokens % len(LAYOUTS)], seed=num_deltas)
        kernels.scale_shift_rows(out, pages, DeltaKernelMeta.build(slots_tensor(slots)))
    assert_close(out, expected, atol=1e-6, rtol=1e-6, what=f"slots={slots}")
    keep = _untouched(slots, flag)
    assert torch.equal(out[keep], y[keep]), "an unflagged or base token changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens, num_deltas, pattern", TRITON_CASES)
def test_triton_and_cpu_match_reference(num_tokens, num_deltas, pattern, dtype):
    n = (24, 40, 72)[num_tokens % 3]
    slots, scale, shift, flag, y = _case(num_tokens, num_deltas, pattern, n, dtype, seed=num_deltas)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    expected = ref_scale_shift_rows(y, scale, shift, flag, slots)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else TOLERANCES[dtype]
    keep = _untouched(slots, flag)
    pages = scale_shift_pages(scale, shift, flag, layout=LAYOUTS[num_tokens % len(LAYOUTS)])
    for name in BACKENDS:
        out = y.clone()
        with on(name):
            kernels.scale_shift_rows(out, pages, meta)
        assert_close(out, expected, **tol, what=f"{name} {dtype} slots={slots}")
        assert torch.equal(out[keep], y[keep]), f"{name}: an unflagged or base token changed"


def test_no_flagged_slot_changes_nothing_and_runs_agree():
    slots = [3] * 10 + [-1] * 2 + [5] * 4 + [3, 5] * 9  # long runs, then alternating (gather path on the CPU)
    _, scale, shift, _, y = _case(len(slots), 6, "identical", 24, torch.float32)
    meta = DeltaKernelMeta.build(slots_tensor(slots, DEVICE))
    for flags in ([0] * 8, [0, 0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1, 0, 0]):
        flag = torch.tensor(flags, dtype=torch.int32, device=DEVICE)
        expected = ref_scale_shift_rows(y, scale, shift, flag, slots)
        pages = scale_shift_pages(scale, shift, flag, layout="regions")
        for name in BACKENDS:
            out = y.clone()
            with on(name):
                kernels.scale_shift_rows(out, pages, meta)
            assert_close(out, expected, atol=2e-6, rtol=2e-6, what=f"{name} flags={flags}")
            if not any(flags):
                assert torch.equal(out, y)


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_raises_value_error_naming_argument(name):
    y = torch.randn(4, 24, device=DEVICE)
    rows = torch.ones(5, 24, device=DEVICE)
    flag = torch.ones(3, dtype=torch.int32, device=DEVICE)
    row = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    meta = DeltaKernelMeta.build(slots_tensor([0, 1, -1, 2], DEVICE))
    good = dict(scale_rows=rows, shift_rows=rows.clone(), row=row, flag=flag)
    for change, arg, fragment in [
        (dict(scale_rows=torch.ones(5, 25, device=DEVICE)), "scale_rows", "[5, 25]"),
        (dict(scale_rows=rows.half()), "scale_rows", "torch.float16"),
        (dict(shift_rows=rows[:2]), "shift_rows", "[2, 24]"),
        (dict(flag=flag.long()), "flag", "torch.int64"),
        (dict(row=row[:2]), "row", "[2]"),
    ]:
        with pytest.raises(ValueError, match=arg) as info, on(name):
            kernels.scale_shift_rows(y, ScaleShiftPages(**{**good, **change}), meta)
        assert fragment in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="meta") as info, on(name):
        kernels.scale_shift_rows(y, ScaleShiftPages(**good), DeltaKernelMeta.build(slots_tensor([0], DEVICE)))
    assert "1 tokens" in str(info.value)
    with pytest.raises(ValueError, match="ScaleShiftPages"), on(name):
        kernels.scale_shift_rows(y, rows, meta)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 133, 4096])
def test_triton_large_on_gpu(num_tokens, dtype):
    slots, scale, shift, flag, y = _case(num_tokens, 32, "zipf", 11008, dtype, seed=1)
    meta = DeltaKernelMeta.build(slots_tensor(slots, "cuda"))
    expected = ref_scale_shift_rows(y, scale, shift, flag, slots)
    with on("triton"):
        kernels.scale_shift_rows(y, scale_shift_pages(scale, shift, flag, layout="regions"), meta)
    assert_close(y, expected, **TOLERANCES[dtype], what=f"cuda {dtype} T={num_tokens}")
