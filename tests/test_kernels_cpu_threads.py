"""The CPU backend's op-thread setting (``kernels/cpu/threads.py``): each CPU delta op runs on
``op_threads()`` intra-op threads (default 1) and gives the process's thread count back after."""
from __future__ import annotations

import threading

import pytest
import torch

import kernels
from kernels import DeltaKernelMeta, cpu
from kernels.cpu.threads import on_op_threads
from kernels.reference import ref_add_bias
from tests.kernel_cases import on, row_pages, slots_tensor


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def setting():
    """Restore the op-thread setting a test changes."""
    before = cpu.op_threads()
    yield
    cpu.set_op_threads(before)


@on_op_threads
def _threads_inside(y: torch.Tensor, inner=None) -> int:
    return inner(y) if inner is not None else torch.get_num_threads()


def test_default_is_one_thread():
    assert cpu.OP_THREADS_DEFAULT == 1 and cpu.op_threads() == cpu.OP_THREADS_DEFAULT


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
    @on_op_threads
    def boom(y):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        boom(torch.zeros(1))
    assert torch.get_num_threads() == 2


def test_overlapping_python_threads_restore_the_count(two_threads):
    inside, release = threading.Barrier(2), threading.Event()

    @on_op_threads
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


def test_cpu_op_result_unchanged_and_threads_restored(two_threads):
    slots = [0, 0, 2, -1, 1, 1, 1, 2]
    g = torch.Generator().manual_seed(0)
    bias, y = torch.randn(3, 16, generator=g), torch.randn(len(slots), 16, generator=g)
    expected = ref_add_bias(y, bias, slots)
    with on("cpu"):
        kernels.add_bias(y, row_pages(bias), DeltaKernelMeta.build(slots_tensor(slots)))
    assert torch.allclose(y, expected.float(), atol=1e-6)
    assert torch.get_num_threads() == 2


def test_setting_picks_the_count_or_leaves_it_alone(two_threads, setting):
    cpu.set_op_threads(None)  # the ops run on the process's count, nothing switched
    assert _threads_inside(torch.zeros(1)) == 2
    torch.set_num_threads(1)
    cpu.set_op_threads(2)
    assert _threads_inside(torch.zeros(1)) == 2
    assert torch.get_num_threads() == 1
    cpu.set_op_threads(1)
    assert _threads_inside(torch.zeros(1)) == 1


def test_other_devices_are_not_switched(two_threads):
    assert _threads_inside(torch.zeros(1, device="meta")) == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_setting_is_refused(bad, setting):
    with pytest.raises(ValueError, match="set_op_threads: expected an int >= 1 or None"):
        cpu.set_op_threads(bad)
    assert cpu.op_threads() == 1
