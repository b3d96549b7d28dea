"""ServerConfig applied by the app at start-up: torch_threads (validated in one place), and the delta
store's limits, settings and default tenant quotas, built from it in one place (``store_config``)."""
from __future__ import annotations

import pytest
import torch

import server.app as app_module
from server.app import apply_torch_threads, auto_torch_threads, store_config
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


@pytest.mark.parametrize("cpus, default, want", [(2, 2, 1), (1, 1, 1), (8, 8, 7), (16, 8, 8), (4, 1, 1)])
def test_zero_leaves_one_cpu_to_the_event_loop(keep_threads, monkeypatch, cpus, default, want):
    monkeypatch.setattr(app_module.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert auto_torch_threads(default) == want
    torch.set_num_threads(default)
    assert apply_torch_threads(ServerConfig(torch_threads=0)) == want
    assert torch.get_num_threads() == want


def test_auto_threads_without_affinity_reads_the_cpu_count(monkeypatch):
    monkeypatch.delattr(app_module.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(app_module.os, "cpu_count", lambda: 4)
    assert auto_torch_threads(4) == 3


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


# ---- memory budgets (server/memory.py) ----------------------------------------------------------
def test_budgets_default_to_fractions_of_free_memory_per_device():
    from server.memory import resolve

    gib = 1 << 30
    cpu = resolve(ServerConfig(), torch.device("cpu"), free_bytes=20 * gib)
    assert (cpu.delta_bytes, cpu.kv_bytes) == (4 * gib, gib)  # 0.25 of free capped at 4 GiB; 1 GiB of KV
    small = resolve(ServerConfig(), torch.device("cpu"), free_bytes=2 * gib)
    assert (small.delta_bytes, small.kv_bytes) == (gib // 2, gib // 2)
    cuda = resolve(ServerConfig(), torch.device("cuda"), free_bytes=70 * gib)
    assert (cuda.delta_bytes, cuda.kv_bytes) == (int(0.1 * 70 * gib), int(0.6 * 70 * gib))
    frac = resolve(ServerConfig(delta_memory_fraction=0.5, kv_memory_fraction=0.25), torch.device("cpu"),
                   free_bytes=8 * gib)
    assert (frac.delta_bytes, frac.kv_bytes) == (4 * gib, 2 * gib)
    blocks = resolve(ServerConfig(kv_blocks=10), torch.device("cpu"), kv_block_bytes=1000, free_bytes=8 * gib)
    assert blocks.kv_bytes == 0  # kv_blocks sizes the cache itself


@pytest.mark.parametrize("values, fragment", [
    (dict(delta_memory_bytes=7 << 30), "delta_memory_bytes=7516192768 + the default KV cache"),
    (dict(kv_memory_bytes=7 << 30, delta_memory_bytes=1 << 30), "+ kv_memory_bytes=7516192768"),
    (dict(kv_blocks=1 << 20), "kv_blocks=1048576 (1048576000 bytes)"),
])
def test_budgets_that_do_not_fit_fail_with_one_line(values, fragment):
    from server.memory import resolve

    with pytest.raises(ConfigError) as err:
        resolve(ServerConfig(**values), torch.device("cpu"), kv_block_bytes=1000, free_bytes=1 << 30)
    msg = str(err.value)
    assert fragment in msg and "exceed the 1073741824 bytes free on cpu" in msg and "\n" not in msg


@pytest.mark.parametrize("values, match", [
    (dict(delta_memory_fraction=1.0), r"delta_memory_fraction must be a number in \[0, 1\)"),
    (dict(kv_memory_fraction=-0.1), r"kv_memory_fraction must be a number in \[0, 1\)"),
    (dict(delta_memory_fraction=0.5, kv_memory_fraction=0.5), "must stay below 1"),
    (dict(delta_memory_bytes=-1), r"delta_memory_bytes must be an integer in \[0, "),
    (dict(max_rank=0), r"max_rank must be an integer in \[1, 16384\]"),
])
def test_bad_budget_settings_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        ServerConfig(**values)


def test_max_slots_is_gone_and_max_rank_costs_nothing():
    with pytest.raises(ConfigError, match="unknown config key.*max_slots"):
        ServerConfig.from_dict({"max_slots": 32})
    assert ServerConfig().max_rank == 256


def test_store_config_carries_the_device_budget_check():
    limits, _ = store_config(ServerConfig(), pin_host_memory=False, device_bytes=lambda d: 10, device_budget_bytes=9)
    assert limits.device_budget_bytes == 9 and limits.device_bytes(None) == 10
    assert store_config(ServerConfig(), pin_host_memory=False)[0].device_budget_bytes == 0
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


def test_cuda_graphs_is_off_by_default_and_refused_on_a_non_cuda_device():
    assert ServerConfig().cuda_graphs is False
    for device in ("cpu", "mps", "CPU"):
        with pytest.raises(ConfigError, match=r"^cuda_graphs needs a CUDA device, got device") as exc:
            ServerConfig(cuda_graphs=True, device=device)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="cuda_graphs must be true or false"):
        ServerConfig(cuda_graphs="yes")
    if not torch.cuda.is_available():  # "auto" resolves to the CPU here
        with pytest.raises(ConfigError, match="device 'auto' resolves to cpu"):
            ServerConfig.from_dict({"cuda_graphs": True})
    else:
        assert ServerConfig(cuda_graphs=True).cuda_graphs is True
        assert ServerConfig(cuda_graphs=True, device="cuda:0").device == "cuda:0"
