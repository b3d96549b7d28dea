"""The grouped plan of the CPU backend (``kernels/cpu/grouped.py``): token groups per cluster of evenly spaced
runs of one rank, rows never read past a slot's rank or outside its run, strided cell views, grouped_mm's layout
rule and the fallback where it fails, and the capability probe. (That the server's arenas place runs of one
rank bucket as equal cells of a region, which is what makes clusters large, is tested with the arenas:
tests/test_deltas_pages.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import DeltaKernelMeta
from kernels.cpu import cpu_add_bottleneck, cpu_add_lora, force_plan
from kernels.cpu import grouped
from kernels.reference import ref_add_bottleneck, ref_add_lora
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import FP32_TOL, adapter_pages, bottleneck_pools, lora_pages, lora_pools, slots_tensor

pytestmark = pytest.mark.skipif(not grouped.supported(torch.empty(0)),
                                reason="F.grouped_mm does not run on this torch (the other plans cover it)")
LORA_KEYS = ("lora_a", "lora_b", "scale", "rank")
BN_KEYS = ("down", "down_bias", "up", "up_bias", "scale", "width", "act")


def _nan_padding(pool: torch.Tensor, sizes: list[int], dim: int) -> None:
    """NaN past each slot's size: a plan that read the padding, even to multiply it by 0, returns NaN."""
    for s, n in enumerate(sizes):
        pool[s].narrow(dim - 1, n, pool.shape[dim] - n).fill_(float("nan"))


def _meta(slots):
    return DeltaKernelMeta.build(slots_tensor(slots))


def test_clusters_of_evenly_spaced_runs_one_per_rank():
    # ranks: slots 1, 4 and 6 rank 4 in cells 8 rows apart (an 8-row bucket region from row 40); slot 2 rank 16
    # alone; slot 3 no LoRA here; slot 5 rank 4 far away (its own cluster); slots 0 and 7 idle
    ranks = {1: 4, 2: 16, 3: 0, 4: 4, 5: 4, 6: 4}
    starts = {1: 40, 2: 0, 3: 0, 4: 56, 5: 400, 6: 64}
    slots = [4, -1, 2, 1, 3, 4, 2, -1, 1, 6, 5]
    meta = _meta(slots)
    work = [s for s in meta.active_slots_host if ranks[s]]
    groups = grouped.groups(meta, ranks, starts, work)
    assert [(g.size, g.members) for g in groups] == [(4, [1, 4, 6]), (4, [5]), (4 * 4, [2])]
    g4 = groups[0]
    assert (starts[g4.members[0]], g4.stride, g4.num_cells) == (40, 8, 4)  # cells at rows 40, 48 (empty), 56, 64
    assert g4.offs.tolist() == [2, 2, 4, 5]
    assert g4.slots.tolist() == [1, 1, 4, 4, 6] and g4.ids.tolist() == [3, 8, 0, 5, 9]
    assert groups[2].ids.tolist() == [2, 6]  # the rank-0 slot's token (4) and the -1 tokens are in no group
    assert grouped.groups(meta, ranks, starts, work) is groups  # built once per step, shared by the layers
    assert grouped.groups(_meta(slots), ranks, starts, work) is not groups
    shifted = {s: a + 1000 for s, a in starts.items()}  # another layer: the same cells in a region further on
    assert grouped.groups(meta, ranks, shifted, work) is groups
    moved = {**starts, 6: 65}  # a start off the lattice: 6 leaves the cluster, and pairs with 5 (335 rows apart)
    assert [g.members for g in grouped.groups(meta, ranks, moved, work)] == [[1, 4], [6, 5], [2]]


def test_too_many_empty_cells_split_a_cluster():
    ranks = {0: 4, 1: 4, 2: 4}
    meta = _meta([0, 1, 2])
    close = grouped.groups(meta, ranks, {0: 0, 1: 8, 2: 16}, [0, 1, 2])
    assert [g.members for g in close] == [[0, 1, 2]]
    far = grouped.groups(meta, ranks, {0: 0, 1: 4, 2: 4 * (grouped.MAX_EMPTY + 1) * 3 + 4}, [0, 1, 2])
    assert [g.members for g in far] == [[0, 1], [2]]


def test_tokens_already_in_cell_order_need_no_gather():
    in_order = _meta([0, 0, 2, 2, 2, 5])
    work = in_order.active_slots_host
    (grp,) = grouped.groups(in_order, {s: 4 for s in work}, {0: 0, 2: 8, 5: 20}, work)
    assert grp.ids is None and grp.offs.tolist() == [2, 2, 5, 5, 5, 6]
    (grp,) = grouped.groups(in_order, {s: 4 for s in work}, {0: 20, 2: 8, 5: 0}, work)  # cells in reverse order
    assert grp.members == [5, 2, 0] and grp.ids.tolist() == [5, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["packed", "regions", "scattered"])
def test_lora_mixed_ranks_never_read_padding(dtype, layout):
    ranks = [1, 4, 8, 16, 64, 0, 4, 16]
    pools = lora_pools(8, 32, 48, ranks, dtype=dtype)
    slots = [6, 0, -1, 4, 3, 5, 1, 2, 7, 6, -1, 4, 0, 2]
    x, y = torch.randn(len(slots), 32).to(dtype), torch.randn(len(slots), 48).to(dtype)
    expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots)
    out = y.clone()
    with force_plan("grouped"):
        cpu_add_lora(out, x, lora_pages(pools, layout=layout, fill=float("nan")), _meta(slots))
    tol = FP32_TOL if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(out, expected, **tol, what=f"grouped {dtype} {layout}")
    untouched = [2, 5, 10]  # slot -1 twice, and slot 5 (rank 0 here): bit for bit
    assert torch.equal(out[untouched], y[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bottleneck_mixed_widths_and_activations_never_read_padding(dtype):
    widths, acts = [8, 3, 0, 16, 8, 5], [1, 3, 0, 2, 0, 3]
    pools = bottleneck_pools(6, 40, widths, acts, max_width=16, dtype=dtype)
    slots = [0, 4, 2, -1, 1, 3, 0, 5, 4, 1]
    y = torch.randn(len(slots), 40).to(dtype)
    expected = ref_add_bottleneck(y, y, *[pools[k] for k in BN_KEYS], slots)
    out = y.clone()
    with force_plan("grouped"):  # u aliases y ("output" placement)
        cpu_add_bottleneck(out, out, adapter_pages(pools, layout="regions", fill=float("nan")), _meta(slots))
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
        a = torch.zeros(3, r, k, dtype=dtype)  # cells of A rows [G, R, in], used as a rank slice's transpose
        b = torch.zeros(3, r, n, dtype=dtype)  # cells of B rows [G, R, out]
        bt = torch.zeros(3, n, r, dtype=dtype)  # a B stored [G, out, R]
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
    pages = lora_pages(pools)
    slots = [3, 1, 0, -1, 2]
    x, y = torch.randn(5, 18), torch.randn(5, 24)
    assert not grouped.lora_ok(x, pages.a_rows, pages.b_rows)
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots)
    for forced in (None, "grouped"):
        out = y.clone()
        if forced:
            with force_plan(forced):
                cpu_add_lora(out, x, pages, meta)
        else:
            cpu_add_lora(out, x, pages, meta)
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
