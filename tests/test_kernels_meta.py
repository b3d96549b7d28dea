"""DeltaKernelMeta (per-step metadata), its preallocated buffers, and the backend switch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta, MetaBuffers
from tests.kernel_cases import PATTERNS, slot_ids, slots_tensor

ROOT = Path(__file__).resolve().parents[1]


def test_running_example_of_the_docstring():
    meta = DeltaKernelMeta.build(slots_tensor([2, 2, -1, 0, 2, 0]))
    assert meta.num_tokens == 6 and not meta.no_delta
    assert meta.active_slots_host == [0, 2] and meta.active_slots.tolist() == [0, 2]
    assert meta.sorted_token_ids.tolist() == [3, 5, 0, 1, 4, 2]
    assert meta.seg_start.tolist() == [0, 2, 5] and meta.seg_len.tolist() == [2, 3]
    assert meta.runs_host == [(0, 2, 2), (3, 4, 0), (4, 5, 2), (5, 6, 0)]
    assert meta.num_active_tokens == 5 and meta.max_seg_len == 3
    assert meta.active_token_ids.tolist() == [0, 1, 3, 4, 5]
    assert meta.active_token_slots.tolist() == [2, 2, 0, 2, 0]
    for t in (meta.sorted_token_ids, meta.active_slots, meta.seg_start, meta.seg_len):
        assert t.dtype == torch.int32


@pytest.mark.parametrize("slots", [[], [-1], [-1, -1, -1]])
def test_no_delta(slots):
    meta = DeltaKernelMeta.build(slots_tensor(slots))
    assert meta.no_delta and meta.active_slots_host == [] and meta.num_active == 0
    assert meta.seg_start.tolist() == [0] and meta.max_seg_len == 0
    assert sorted(meta.sorted_token_ids.tolist()) == list(range(len(slots)))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("num_tokens, num_deltas", [(1, 1), (17, 3), (64, 8), (300, 32)])
def test_segments_are_a_stable_grouping(pattern, num_tokens, num_deltas):
    slots = slot_ids(num_tokens, num_deltas, pattern, pool_slots=40, seed=num_tokens, none_fraction=0.25)
    meta = DeltaKernelMeta.build(slots_tensor(slots), slots)
    order = meta.sorted_token_ids.tolist()
    assert sorted(order) == list(range(num_tokens))
    assert meta.active_slots_host == sorted({s for s in slots if s >= 0})
    for k, s in enumerate(meta.active_slots_host):
        seg = order[meta.seg_start_host[k]:meta.seg_start_host[k + 1]]
        assert seg == [i for i, v in enumerate(slots) if v == s]  # stable: token order inside a segment
        assert meta.seg_len[k].item() == len(seg)
    assert [slots[i] for i in order[meta.num_active_tokens:]] == [-1] * (num_tokens - meta.num_active_tokens)
    covered = [i for a, b, s in meta.runs_host for i in range(a, b) if all(slots[j] == s for j in range(a, b))]
    assert covered == [i for i, s in enumerate(slots) if s >= 0]
    assert all(meta.runs_host[i][2] != meta.runs_host[i + 1][2] or meta.runs_host[i][1] != meta.runs_host[i + 1][0]
               for i in range(len(meta.runs_host) - 1))  # runs are maximal
    assert meta.max_seg_len == max(meta.seg_len.tolist(), default=0)


def test_host_list_is_optional():
    slots = [4, -1, 4, 1, 1, 0]
    a = DeltaKernelMeta.build(slots_tensor(slots))
    b = DeltaKernelMeta.build(slots_tensor(slots), slots)
    for name in ("sorted_token_ids", "active_slots", "seg_start", "seg_len"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.runs_host == b.runs_host


INDEX_TENSORS = ("sorted_token_ids", "active_slots", "seg_start", "seg_len")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_buffers_give_the_same_meta_as_fresh_tensors(pattern):
    buffers = MetaBuffers(max_tokens=300, max_slots=40)
    for num_tokens, num_deltas in ((1, 1), (17, 3), (300, 32), (64, 8), (0, 1)):  # shrinking steps reuse the tails
        slots = slot_ids(num_tokens, num_deltas, pattern, pool_slots=40, seed=num_tokens,
                         none_fraction=0.25) if num_tokens else []
        fresh = DeltaKernelMeta.build(slots_tensor(slots), slots)
        kept = DeltaKernelMeta.build(slots_tensor(slots), slots, buffers=buffers)
        for name in INDEX_TENSORS:
            assert getattr(kept, name).tolist() == getattr(fresh, name).tolist(), (name, num_tokens)
            assert getattr(kept, name).dtype == torch.int32
        assert (kept.runs_host, kept.active_slots_host, kept.max_seg_len, kept.no_delta) == \
            (fresh.runs_host, fresh.active_slots_host, fresh.max_seg_len, fresh.no_delta)


def test_buffers_keep_their_addresses_from_step_to_step():
    """The index tensors a step's kernels read sit at the same addresses every step (refilled by copy_)."""
    buffers = MetaBuffers(max_tokens=16, max_slots=4)
    first = DeltaKernelMeta.build(slots_tensor([0] * 16), [0] * 16, buffers=buffers)
    ptrs = {name: getattr(first, name).data_ptr() for name in INDEX_TENSORS}
    for slots in ([1, -1, 3], [2] * 7, [3, 2, 1, 0, -1, 0], [-1, -1]):
        meta = DeltaKernelMeta.build(slots_tensor(slots), slots, buffers=buffers)
        for name in INDEX_TENSORS:
            view = getattr(meta, name)
            assert view.numel() == 0 or view.data_ptr() == ptrs[name], (name, slots)  # an empty view has none
        assert meta.sorted_token_ids.tolist() == sorted(range(len(slots)), key=lambda i: (slots[i] < 0, slots[i]))
        assert all(t.untyped_storage().data_ptr() == buffers.storage.untyped_storage().data_ptr()
                   for t in (meta.sorted_token_ids, meta.active_slots, meta.seg_start, meta.seg_len))


@pytest.mark.parametrize("slots, fragment", [
    (list(range(5)) * 4, "20 tokens exceed max_tokens=16"),
    ([0, 1, 2, 3, 4], "5 active slots exceed max_slots=4"),
])
def test_buffers_refuse_a_step_larger_than_them(slots, fragment):
    buffers = MetaBuffers(max_tokens=16, max_slots=4)
    with pytest.raises(ValueError, match=fragment):
        DeltaKernelMeta.build(slots_tensor(slots), slots, buffers=buffers)


def test_buffers_refuse_bad_sizes_and_another_device():
    with pytest.raises(ValueError, match=r"max_tokens \(0\)"):
        MetaBuffers(0, 4)
    buffers = MetaBuffers(8, 4, device="meta")
    with pytest.raises(ValueError, match="buffers on meta, token_slots on cpu"):
        DeltaKernelMeta.build(slots_tensor([0, 1]), [0, 1], buffers=buffers)


@pytest.mark.parametrize("token_slots, host, fragment", [
    (torch.tensor([0, 1]), None, "int32"),
    (torch.zeros(2, 2, dtype=torch.int32), None, "1-D"),
    (slots_tensor([0, 1]), [0], "1 entries"),
    (slots_tensor([0, -2]), None, ">= -1"),
])
def test_bad_token_slots(token_slots, host, fragment):
    with pytest.raises(ValueError, match="token_slots") as info:
        DeltaKernelMeta.build(token_slots, host)
    assert fragment in str(info.value)


def test_backend_override_nests_and_restores():
    base = kernels.current_backend()
    with kernels.backend("triton"):
        assert kernels.current_backend() == "triton"
        with kernels.backend("cpu"):
            assert kernels.current_backend(torch.zeros(1)) == "cpu"
        assert kernels.current_backend() == "triton"
    assert kernels.current_backend() == base
    with kernels.backend("auto"):
        # auto: Triton for CUDA tensors or under the interpreter (D5)
        want = "triton" if kernels.use_triton(torch.zeros(1)) else "cpu"
        assert kernels.current_backend(torch.zeros(1)) == want
    with pytest.raises(ValueError, match="cuda"):
        with kernels.backend("cuda"):
            pass


def test_conftest_default_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("conftest only picks the CPU backend without CUDA")
    assert os.environ.get("DELTASERVE_KERNELS") == "cpu"
    assert kernels.current_backend(torch.zeros(1)) == "cpu"


def test_unknown_backend_in_environment_fails_at_import():
    env = {**os.environ, "DELTASERVE_KERNELS": "fast"}
    proc = subprocess.run([sys.executable, "-c", "import kernels"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "DELTASERVE_KERNELS='fast'" in proc.stderr and "auto, triton, cpu" in proc.stderr


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("num_tokens, num_deltas", [(1, 1), (17, 3), (64, 8), (37, 5)])
def test_restrict_keeps_only_the_given_slots(pattern, num_tokens, num_deltas):
    slots = slot_ids(num_tokens, num_deltas, pattern, pool_slots=40, seed=num_tokens, none_fraction=0.25)
    meta = DeltaKernelMeta.build(slots_tensor(slots), slots)
    active = meta.active_slots_host
    assert meta.restrict(frozenset(active)) is meta  # every active slot: the step's own meta
    assert meta.restrict(frozenset(active) | {99}) is meta
    keep = frozenset(active[::2])
    sub = meta.restrict(keep)
    masked = [s if s in keep else -1 for s in slots]
    want = DeltaKernelMeta.build(slots_tensor(masked), masked)
    assert sub.token_slots.tolist() == masked
    for name in ("num_tokens", "no_delta", "active_slots_host", "seg_start_host", "num_active_tokens", "max_seg_len",
                 "runs_host"):
        assert getattr(sub, name) == getattr(want, name), name
    assert sub.sorted_token_ids.tolist() == want.sorted_token_ids.tolist()
    assert meta.restrict(keep) is sub  # built once per step and set: every layer asking shares it
    none = meta.restrict(frozenset())
    assert none.no_delta and none.num_tokens == num_tokens
