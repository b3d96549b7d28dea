"""The exact reference (``kernels/reference.py``) against the slowest form of each op's semantics: a
float64 loop over single tokens, written out here. The reference groups tokens by slot; this checks the
grouping (slot -1, rank or width 0, aliasing, order of slots) and that it never changes its inputs."""
from __future__ import annotations

import pytest
import torch

from kernels.activations import ACT_FNS
from kernels.reference import ref_add_bias, ref_add_bottleneck, ref_add_lora, ref_mul_rows
from tests.kernel_cases import PATTERNS, bottleneck_pools, lora_pools, slot_ids, slots_tensor


def _token_lora(y, x, lora_a, lora_b, scale, rank, slots):
    out = y.double().clone()
    for t, s in enumerate(slots):
        r = int(rank[s]) if s >= 0 else 0
        if r:
            out[t] += float(scale[s]) * ((x[t].double() @ lora_a[s, :r].double().T) @ lora_b[s, :, :r].double().T)
    return out


def _token_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, slots):
    out, u = y.double().clone(), u.double().clone()
    for t, s in enumerate(slots):
        m = int(width[s]) if s >= 0 else 0
        if m:
            h = ACT_FNS[int(act[s])](u[t] @ down[s, :m].double().T + down_bias[s, :m].double())
            out[t] += float(scale[s]) * (h @ up[s, :, :m].double().T + up_bias[s].double())
    return out


def _token_rows(t, vec, slots, multiply):
    out = t.double().clone()
    for i, s in enumerate(slots):
        if s >= 0:
            out[i] = out[i] * vec[s].double() if multiply else out[i] + vec[s].double()
    return out


def _slots(pattern, num_tokens=23, num_deltas=5):
    return slot_ids(num_tokens, num_deltas, pattern, pool_slots=num_deltas + 2, seed=3, none_fraction=0.2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_lora_reference_is_the_per_token_loop(pattern):
    slots = _slots(pattern)
    pools = lora_pools(7, 24, 40, [4, 0, 16, 1, 64, 8, 4], seed=1)
    args = (pools["lora_a"], pools["lora_b"], pools["scale"], pools["rank"])
    x, y = torch.randn(len(slots), 24), torch.randn(len(slots), 40)
    before = y.clone()
    got = ref_add_lora(y, x, *args, slots)
    assert got.dtype == torch.float64 and torch.equal(y, before)  # a new tensor; the input untouched
    torch.testing.assert_close(got, _token_lora(y, x, *args, slots), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ref_add_lora(y, x, *args, slots_tensor(slots)), got, atol=0, rtol=0)  # a tensor map


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bottleneck_reference_is_the_per_token_loop(pattern):
    slots = _slots(pattern)
    pools = bottleneck_pools(7, 40, [8, 3, 0, 16, 8, 5, 1], [1, 3, 0, 2, 0, 3, 1], max_width=16, seed=2)
    args = [pools[k] for k in ("down", "down_bias", "up", "up_bias", "scale", "width", "act")]
    y = torch.randn(len(slots), 40)
    before = y.clone()
    got = ref_add_bottleneck(y, y, *args, slots)  # u aliases y ("output" placement)
    assert torch.equal(y, before)
    torch.testing.assert_close(got, _token_bottleneck(y, y, *args, slots), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("multiply", [False, True], ids=["add_bias", "mul_rows"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_row_references_are_the_per_token_loop(pattern, multiply):
    slots = _slots(pattern)
    vec, t = torch.randn(7, 40), torch.randn(len(slots), 40)
    fn = ref_mul_rows if multiply else ref_add_bias
    torch.testing.assert_close(fn(t, vec, slots), _token_rows(t, vec, slots, multiply), atol=0, rtol=0)


def test_tokens_without_a_delta_and_rank_zero_slots_are_the_input():
    pools = lora_pools(3, 8, 8, [4, 0, 4])
    y = torch.randn(4, 8)
    got = ref_add_lora(y, torch.randn(4, 8), pools["lora_a"], pools["lora_b"], pools["scale"], pools["rank"],
                       [-1, 1, 0, -1])
    assert torch.equal(got[[0, 1, 3]], y[[0, 1, 3]].double()) and not torch.equal(got[2], y[2].double())
