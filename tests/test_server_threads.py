"""ServerConfig.torch_threads: validated in one place and applied by the app at start-up."""
from __future__ import annotations

import pytest
import torch

from server.app import apply_torch_threads
from server.config import ConfigError, ServerConfig


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [-1, 1025, 1.5, "2"])
def test_torch_threads_out_of_range_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"torch_threads must be an integer in \[0, 1024\]"):
        ServerConfig(torch_threads=bad)


def test_torch_threads_from_a_config_dict():
    assert ServerConfig.from_dict({"torch_threads": 3}).torch_threads == 3


def test_apply_sets_the_process_thread_count(keep_threads):
    target = 1 if keep_threads != 1 else 2
    assert apply_torch_threads(ServerConfig(torch_threads=target)) == target
    assert torch.get_num_threads() == target


def test_zero_keeps_the_current_thread_count(keep_threads):
    torch.set_num_threads(2)
    assert apply_torch_threads(ServerConfig(torch_threads=0)) == 2
    assert torch.get_num_threads() == 2
