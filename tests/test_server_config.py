"""ServerConfig applied by the app at start-up: torch_threads (validated in one place), and the delta
store's limits, settings and default tenant quotas, built from it in one place (``store_config``)."""
from __future__ import annotations

import pytest
import torch

from server.app import apply_torch_threads, store_config
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


def test_store_config_takes_every_store_value_from_the_server_config():
    config = ServerConfig(max_rank=4, max_bottleneck=8, host_cache_bytes=123, max_upload_bytes=456,
                          default_max_deltas=7, default_max_delta_bytes=8, default_requests_per_minute=9,
                          default_tokens_per_minute=10, default_max_concurrent=11, max_archive_bytes=789,
                          max_archive_ratio=3.5)
    limits, settings = store_config(config, pin_host_memory=True)
    assert (limits.max_rank, limits.max_bottleneck) == (4, 8)
    assert (settings.host_cache_bytes, settings.max_upload_bytes, settings.pin_host_memory) == (123, 456, True)
    assert (settings.max_archive_bytes, settings.max_archive_ratio) == (789, 3.5)
    q = settings.default_quotas
    assert (q.max_deltas, q.max_bytes, q.requests_per_minute, q.tokens_per_minute, q.max_concurrent) == (7, 8, 9, 10, 11)
    assert store_config(ServerConfig(), pin_host_memory=False)[1].pin_host_memory is False


@pytest.mark.parametrize("key,bad,message", [
    ("health_grace_seconds", -1.0, "health_grace_seconds must be a number >= 0"),
    ("grace_seconds", "5", "grace_seconds must be a number >= 0"),
    ("max_archive_ratio", 0.5, r"max_archive_ratio must be a number in \[1, 1e6\]"),
    ("max_uploads", 0, r"max_uploads must be an integer in \[1, 4096\]"),
    ("max_uploads_per_tenant", 0, r"max_uploads_per_tenant must be an integer in \[1, 4096\]"),
    ("max_prompt_bytes", -1, r"max_prompt_bytes must be an integer"),
])
def test_resource_bounds_are_validated_naming_the_key(key, bad, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**{key: bad})


def test_prompt_bytes_default_to_16_per_token_of_the_resolved_max_model_len():
    from server.app import with_max_model_len

    assert ServerConfig(max_model_len=1024).prompt_bytes_limit == 16 * 1024
    assert ServerConfig(max_model_len=1024, max_prompt_bytes=100).prompt_bytes_limit == 100
    resolved = with_max_model_len(ServerConfig(), 8192, 4096)  # max_model_len 0 -> the model's, capped by the KV
    assert resolved.max_prompt_bytes == 0 and resolved.prompt_bytes_limit == 16 * 4096


def test_max_model_len_is_the_models_limit_capped_by_the_kv_cache():
    from server.app import with_max_model_len

    assert with_max_model_len(ServerConfig(), 8192, 23296).max_model_len == 8192  # SmolLM2 on a 1 GiB CPU cache
    assert with_max_model_len(ServerConfig(), 8192, 4096).max_model_len == 4096  # capped: logged capped_by_kv=True
    assert with_max_model_len(ServerConfig(), None, 1 << 20).max_model_len == 2048  # a config without a limit
    assert with_max_model_len(ServerConfig(max_model_len=512), 8192, 23296).max_model_len == 512
    assert with_max_model_len(ServerConfig(max_model_len=9000), 8192, 4096).max_model_len == 4096


def test_new_config_fields_are_checked():
    assert ServerConfig(openai_listen="").openai_listen == ""
    for bad in (dict(openai_listen="nowhere"), dict(generation_config="vllm"), dict(max_model_len=4)):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)
