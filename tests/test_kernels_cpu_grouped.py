"""The grouped plan of the CPU backend (``kernels/cpu/grouped.py``): token groups per distinct rank, pools
never read past a slot's rank, grouped_mm's layout rule and the fallback where it fails, and the capability
probe. (That the server's pools are stored the way this plan reads them in place is tested with the
pools: ``test_delta_linear_pools_store_b_and_up_as_rows``, tests/test_model_wrap.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import DeltaKernelMeta
from kernels.cpu import cpu_add_bottleneck, cpu_add_lora, force_plan
from kernels.cpu import grouped
from kernels.reference import ref_add_bottleneck, ref_add_lora
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import FP32_TOL, bottleneck_pools, lora_pools, slots_tensor

pytestmark = pytest.mark.skipif(not grouped.supported(torch.empty(0)),
                                reason="F.grouped_mm does not run on this torch (the other plans cover it)")
LORA_KEYS = ("lora_a", "lora_b", "scale", "rank")
BN_KEYS = ("down", "down_bias", "up", "up_bias", "scale", "width", "act")


def _nan_padding(pool: torch.Tensor, sizes: list[int], dim: int) -> None:
    """NaN past each slot's size: a plan that read the padding, even to multiply it by 0, returns NaN."""
    for s, n in enumerate(sizes):
        pool[s].narrow(dim - 1, n, pool.shape[dim] - n).fill_(float("nan"))


def test_groups_one_per_distinct_rank_without_unused_slots():
    # slots 1 and 4 share rank 4; slot 2 has rank 16; slot 3 has no LoRA here; slot 0 and 5 are idle
    ranks = [8, 4, 16, 0, 4, 8]
    slots = [4, -1, 2, 1, 3, 4, 2, -1, 1]
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    work = [s for s in meta.active_slots_host if ranks[s]]
    groups = grouped.groups(meta, ranks, work)
    assert [g.size for g in groups] == [4, 16]
    g4, g16 = groups
    assert (g4.lo, g4.hi) == (1, 5)  # the pool is sliced to the span of the group's slots
    assert g4.offs.tolist() == [2, 2, 2, 4]  # slot 1: 2 tokens, slots 2 and 3: empty groups, slot 4: 2 tokens
    assert g4.slots.tolist() == [1, 1, 4, 4] and g4.ids.tolist() == [3, 8, 0, 5]
    assert (g16.lo, g16.hi, g16.offs.tolist()) == (2, 3, [2])
    assert g16.ids.tolist() == [2, 6]  # the rank-0 slot's token (4) and the -1 tokens (1, 7) are in no group
    assert grouped.groups(meta, ranks, work) is groups  # built once per step, shared by the layers
    assert grouped.groups(DeltaKernelMeta.build(slots_tensor(slots)), ranks, work) is not groups


def test_tokens_already_in_slot_order_need_no_gather():
    in_order = DeltaKernelMeta.build(slots_tensor([0, 0, 2, 2, 2, 5]))
    (grp,) = grouped.groups(in_order, [4] * 6, in_order.active_slots_host)
    assert grp.ids is None and grp.offs.tolist() == [2, 2, 5, 5, 5, 6]
    reordered = DeltaKernelMeta.build(slots_tensor([2, 2, 0, 0, 5, 5]))
    (grp,) = grouped.groups(reordered, [4] * 6, reordered.active_slots_host)
    assert grp.ids.tolist() == [2, 3, 0, 1, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b_transposed", [False, True], ids=["b_out_r", "b_r_out"])
def test_lora_mixed_ranks_never_read_padding(dtype, b_transposed):
    ranks = [1, 4, 8, 16, 64, 0, 4, 16]
    pools = lora_pools(8, 32, 48, ranks, dtype=dtype)
    _nan_padding(pools["lora_a"], ranks, 1)
    _nan_padding(pools["lora_b"], ranks, 2)
    if b_transposed:
        pools["lora_b"] = pools["lora_b"].transpose(1, 2).contiguous().transpose(1, 2)
    slots = [6, 0, -1, 4, 3, 5, 1, 2, 7, 6, -1, 4, 0, 2]
    x, y = torch.randn(len(slots), 32).to(dtype), torch.randn(len(slots), 48).to(dtype)
    expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots)
    out = y.clone()
    with force_plan("grouped"):
        cpu_add_lora(out, x, *[pools[k] for k in LORA_KEYS], DeltaKernelMeta.build(slots_tensor(slots)))
    tol = FP32_TOL if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(out, expected, **tol, what=f"grouped {dtype}")
    untouched = [2, 5, 10]  # slot -1 twice, and slot 5 (rank 0 here): bit for bit
    assert torch.equal(out[untouched], y[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bottleneck_mixed_widths_and_activations_never_read_padding(dtype):
    widths, acts = [8, 3, 0, 16, 8, 5], [1, 3, 0, 2, 0, 3]
    pools = bottleneck_pools(6, 40, widths, acts, max_width=16, dtype=dtype)
    _nan_padding(pools["down"], widths, 1)
    _nan_padding(pools["down_bias"], widths, 1)
    _nan_padding(pools["up"], widths, 2)
    pools["up"] = pools["up"].transpose(1, 2).contiguous().transpose(1, 2)  # as AdapterPool stores it
    slots = [0, 4, 2, -1, 1, 3, 0, 5, 4, 1]
    y = torch.randn(len(slots), 40).to(dtype)
    expected = ref_add_bottleneck(y, y, *[pools[k] for k in BN_KEYS], slots)
    out = y.clone()
    with force_plan("grouped"):  # u aliases y ("output" placement)
        cpu_add_bottleneck(out, out, *[pools[k] for k in BN_KEYS], DeltaKernelMeta.build(slots_tensor(slots)))
    tol = dict(atol=5e-5, rtol=2e-5) if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(out, expected, **tol, what=f"grouped {dtype}")
    assert torch.equal(out[[2, 3]], y[[2, 3]])  # width-0 slot (no up_bias either) and slot -1


def _grouped_mm_accepts(t: torch.Tensor) -> bool:
    """Ask the op itself whether ``t`` [S, k, n] is an acceptable right operand."""
    x = grouped.aligned_empty(2, t.shape[1], t.dtype, t.device).zero_()  # a valid left operand
    try:
        F.grouped_mm(x, t, offs=torch.full((t.shape[0],), 2, dtype=torch.int32))
    except RuntimeError as exc:
        assert "16 bytes" in str(exc) or "strides" in str(exc).lower(), exc
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layout_check_agrees_with_grouped_mm(dtype):
    cases = []
    for k, n, r in ((16, 24, 8), (18, 24, 8), (16, 12, 8), (16, 20, 4), (24, 40, 64), (17, 33, 1)):
        a = torch.zeros(3, r, k, dtype=dtype)  # an A pool [S, R, in], used as its rank slice's transpose
        b = torch.zeros(3, r, n, dtype=dtype)  # a B pool stored [S, R, out]
        bt = torch.zeros(3, n, r, dtype=dtype)  # a B pool stored [S, out, R]
        cases += [a[:, :max(1, r // 2)].transpose(1, 2), b[:, :max(1, r // 2)], bt.transpose(1, 2)[:, :max(1, r // 2)]]
    seen = set()
    for t in cases:
        ok = grouped.layout_ok(t)
        assert ok == _grouped_mm_accepts(t), (tuple(t.shape), t.stride(), dtype, ok)
        seen.add(ok)
    assert seen == {True, False}  # both outcomes were exercised


def test_misaligned_layer_falls_back_to_the_other_plans():
    # in = 18: an fp32 row of x is 72 bytes, not a multiple of 16, so grouped_mm would refuse it
    pools = lora_pools(4, 18, 24, [4, 8, 2, 16])
    slots = [3, 1, 0, -1, 2]
    x, y = torch.randn(5, 18), torch.randn(5, 24)
    assert not grouped.lora_ok(x, pools["lora_a"], pools["lora_b"])
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots)
    for forced in (None, "grouped"):
        out = y.clone()
        if forced:
            with force_plan(forced):
                cpu_add_lora(out, x, *[pools[k] for k in LORA_KEYS], meta)
        else:
            cpu_add_lora(out, x, *[pools[k] for k in LORA_KEYS], meta)
        assert_close(out, expected, **FP32_TOL, what=f"misaligned, forced={forced}")


def test_probe_follows_the_op(monkeypatch):
    assert grouped._probe(torch.float32)

    def refuses(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported on this device")

    def wrong(mat_a, mat_b, *, offs=None, **kwargs):  # runs, but ignores the groups
        return mat_a @ mat_b[0]

    for fake in (refuses, wrong):
        monkeypatch.setattr(F, "grouped_mm", fake)
        assert not grouped._probe(torch.float32), fake.__name__
    monkeypatch.delattr(F, "grouped_mm")
    assert not grouped._probe(torch.float32)


def test_only_cpu_tensors_take_the_grouped_plan():
    # on CUDA the Triton kernels serve, and grouped_mm there wants bf16 and aligned ranks
    assert grouped.supported(torch.empty(0))
    assert not grouped.supported(torch.empty(0, device="meta"))
