"""The reference delta ops run on one intra-op thread and give the process's thread count back after."""
from __future__ import annotations

import threading

import pytest
import torch

from kernels import DeltaKernelMeta, reference
from kernels.reference_common import one_thread
from tests.test_kernels_cases import loop_rows, slots_tensor


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@one_thread
def _threads_inside(y: torch.Tensor, inner=None) -> int:
    return inner(y) if inner is not None else torch.get_num_threads()


def test_one_thread_inside_and_restored_after(two_threads):
    assert _threads_inside(torch.zeros(1)) == 1
    assert torch.get_num_threads() == 2


def test_nested_sections_restore_only_at_the_outermost(two_threads):
    def inner(y):
        assert _threads_inside(y) == 1
        return torch.get_num_threads()

    assert _threads_inside(torch.zeros(1), inner) == 1
    assert torch.get_num_threads() == 2


def test_restored_after_an_exception(two_threads):
    @one_thread
    def boom(y):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        boom(torch.zeros(1))
    assert torch.get_num_threads() == 2


def test_overlapping_python_threads_restore_the_count(two_threads):
    inside, release = threading.Barrier(2), threading.Event()

    @one_thread
    def hold(y):
        inside.wait(timeout=10)
        release.wait(timeout=10)
        return torch.get_num_threads()

    seen = []
    workers = [threading.Thread(target=lambda: seen.append(hold(torch.zeros(1)))) for _ in range(2)]
    for w in workers:
        w.start()
    release.set()
    for w in workers:
        w.join(timeout=10)
    assert seen == [1, 1]
    assert torch.get_num_threads() == 2


def test_reference_op_result_unchanged_and_threads_restored(two_threads):
    slots = [0, 0, 2, -1, 1, 1, 1, 2]
    g = torch.Generator().manual_seed(0)
    bias, y = torch.randn(3, 16, generator=g), torch.randn(len(slots), 16, generator=g)
    expected = loop_rows(y, bias, slots, multiply=False)
    reference.add_bias(y, bias, DeltaKernelMeta.build(slots_tensor(slots)))
    assert torch.allclose(y, expected.float(), atol=1e-6)
    assert torch.get_num_threads() == 2
