"""Prompt and prefix deltas through the real server: gRPC upload of each format, then Generate.

Two servers on the reference fixtures' bases (Llama with grouped-query attention, GPT-2): every prompt format
is uploaded as a tenant would (a tar.gz of the folder the library wrote) and its greedy tokens equal the
library's model computed without a cache. Replacing a prompt delta's version, or deleting it and uploading
new content under the name, never serves the old KV: the output is bit for bit what a server that only ever
held the new content answers. A prompt plus the delta's virtual tokens past max_model_len is INVALID_ARGUMENT
naming both numbers, whether the delta is resident yet or not; an upload whose virtual tokens leave no room
is refused and nothing is stored.
"""
from __future__ import annotations

import copy

import grpc
import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from delta_store.base_spec import BaseSpec
from server.pb import common_pb2
from tests.helpers import FIXTURES, import_delta
from tests.oracles import peft_greedy, prompt_greedy, randomise_peft
from tests.server_harness import Served, code_of, fixture_model, tar_gz

N_NEW = 6
MAX_LEN = 48
PEFT = {"peft-prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
        "peft-p_tuning": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3,
                                                     encoder_hidden_size=16),
        "peft-prefix_tuning": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
        "peft-prefix_projection": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                                             prefix_projection=True, encoder_hidden_size=16)}
LIBRARY = {"llama": ["adapterhub/llama-prefix_tuning", "adapterhub/llama-prefix_tuning_flat", "adapterhub/llama-mam",
                     "opendelta/llama-soft_prompt"],
           "gpt2": ["opendelta/gpt2-prefix", "opendelta/gpt2-soft_prompt", "adapterhub/gpt2-mam"]}
KINDS = {common_pb2.DELTA_KIND_PROMPT, common_pb2.DELTA_KIND_PREFIX}
_SERVERS: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield _SERVERS
    for srv, *_ in _SERVERS.values():
        srv.close()


def server(servers, tmp_path_factory, arch: str):
    """(server, tenant client, local base model, its BaseSpec) for one fixture base, started once."""
    if arch not in servers:
        root = tmp_path_factory.mktemp(arch)
        model_dir = fixture_model(arch, root / "model")
        srv = Served(root, model_dir, max_model_len=MAX_LEN, kv_block_size=4)
        _tenant, key = srv.client.create_tenant(f"t-{arch}")
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        servers[arch] = (srv, srv.client.with_key(key), base, BaseSpec.from_model(base))
    return servers[arch]


def peft_folder(base, name: str, folder, seed: int):
    pm = get_peft_model(copy.deepcopy(base), PEFT[name]())
    randomise_peft(pm, seed, std=0.5)
    pm.eval().save_pretrained(folder)
    return pm


def prompt_of(case: str) -> list[int]:
    return load_file(str(FIXTURES / case / "expected.safetensors"))["input_ids"][0].tolist()


def generate(client, delta: str, prompt: list[int], n: int = N_NEW):
    chunks = list(client.generate(prompt, delta=delta, max_new_tokens=n, temperature=0.0, ignore_eos=True,
                                  logprobs=True))
    return [t for c in chunks for t in c.token_ids], [p for c in chunks for p in c.logprobs]


@pytest.mark.parametrize("arch,name", [(a, n) for a in ("llama", "gpt2") for n in PEFT])
def test_peft_prompt_formats_through_the_server(servers, tmp_path_factory, tmp_path, arch, name):
    srv, client, base, _spec = server(servers, tmp_path_factory, arch)
    pm = peft_folder(base, name, tmp_path / name, seed=len(name))
    version = client.upload(name, tar_gz(tmp_path / name))
    assert set(version.kinds) & KINDS and version.source_format == common_pb2.SOURCE_FORMAT_PEFT
    prompt = prompt_of(f"opendelta/{arch}-soft_prompt")
    tokens, _ = generate(client, name, prompt)
    assert tokens == peft_greedy(pm, prompt, N_NEW)[0]
    assert tokens != peft_greedy(base, prompt, N_NEW)[0], "the delta must change the output"
    srv.idle()


@pytest.mark.parametrize("arch,case", [(a, c) for a, cases in LIBRARY.items() for c in cases])
def test_adapterhub_and_opendelta_prompt_formats_through_the_server(servers, tmp_path_factory, arch, case):
    srv, client, base, spec = server(servers, tmp_path_factory, arch)
    name = case.replace("/", "-")
    version = client.upload(name, tar_gz(FIXTURES / case))
    assert set(version.kinds) & KINDS
    delta = import_delta(FIXTURES / case, spec)
    for row in load_file(str(FIXTURES / case / "expected.safetensors"))["input_ids"][:2].tolist():
        tokens, _ = generate(client, name, row)
        assert tokens == prompt_greedy(base, delta, spec, row, N_NEW), case
    srv.idle()


def test_replacing_or_deleting_a_prompt_delta_never_serves_the_old_kv(servers, tmp_path_factory, tmp_path):
    srv, client, base, _spec = server(servers, tmp_path_factory, "llama")
    prompt = prompt_of("opendelta/llama-soft_prompt")
    pms = {v: peft_folder(base, "peft-prefix_tuning", tmp_path / f"v{v}", seed=100 + v) for v in (1, 2, 3)}
    expected = {v: peft_greedy(pm, prompt, N_NEW)[0] for v, pm in pms.items()}
    assert len({tuple(t) for t in expected.values()}) == 3, "three versions with three different outputs"
    client.upload("swap", tar_gz(tmp_path / "v1"))
    assert generate(client, "swap", prompt)[0] == expected[1]
    assert client.upload("swap", tar_gz(tmp_path / "v2")).version == 2
    after_replace = generate(client, "swap", prompt)
    assert after_replace[0] == expected[2]
    assert generate(client, "swap@1", prompt)[0] == expected[1]  # the pinned old version is still its own
    client.delete_delta("swap")
    assert code_of(lambda: generate(client, "swap", prompt)).code() == grpc.StatusCode.NOT_FOUND
    client.upload("swap", tar_gz(tmp_path / "v3"))
    after_delete = generate(client, "swap", prompt)
    assert after_delete[0] == expected[3]
    srv.idle()
    # a server that only ever held the new contents answers the same, bit for bit (tokens and logprobs)
    fresh_root = tmp_path_factory.mktemp("fresh")
    fresh = Served(fresh_root, fixture_model("llama", fresh_root / "model"), max_model_len=MAX_LEN, kv_block_size=4)
    try:
        _tenant, key = fresh.client.create_tenant("t")
        other = fresh.client.with_key(key)
        other.upload("two", tar_gz(tmp_path / "v2"))
        other.upload("three", tar_gz(tmp_path / "v3"))
        assert generate(other, "two", prompt) == after_replace
        assert generate(other, "three", prompt) == after_delete
    finally:
        fresh.close()


def test_prompt_plus_virtual_tokens_past_max_model_len_is_invalid_argument(servers, tmp_path_factory, tmp_path):
    srv, client, base, _spec = server(servers, tmp_path_factory, "llama")
    peft_folder(base, "peft-prompt_tuning", tmp_path / "p", seed=7)  # 5 virtual tokens
    client.upload("five", tar_gz(tmp_path / "p"))
    long_prompt = list(range(3, 3 + MAX_LEN - 8))  # 40 + 6 new = 46 fits; plus 5 virtual tokens = 51 does not
    for when in ("not resident yet", "resident"):
        err = code_of(lambda: generate(client, "five", long_prompt))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, when
        assert "prompt of 40 tokens plus the delta's 5 virtual tokens plus max_new_tokens 6 = 51 exceeds " \
               f"max_model_len={MAX_LEN}" in err.details(), err.details()
        generate(client, "five", long_prompt[:10], n=1)  # fits: the delta is resident afterwards
    assert len(generate(client, "", long_prompt)[0]) == N_NEW  # the same request without the delta fits
    srv.idle()


def test_upload_whose_virtual_tokens_leave_no_room_is_refused_and_not_stored(servers, tmp_path_factory, tmp_path):
    _srv, client, base, _spec = server(servers, tmp_path_factory, "llama")
    pm = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                num_virtual_tokens=MAX_LEN - 1))
    pm.eval().save_pretrained(tmp_path / "huge")
    err = code_of(lambda: client.upload("huge", tar_gz(tmp_path / "huge")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"num_virtual_tokens {MAX_LEN - 1} leaves no room under the server's max_model_len {MAX_LEN}" \
        in err.details()
    assert "huge" not in {d.name for d in client.list_deltas()}


def test_zz_prefix_metrics_after_traffic(servers, tmp_path_factory):
    """Prompt prefixes computed, cache lookups and hits counted, requests by delta kind; no label names a delta
    (but the router view's resident-delta list, vllm:lora_requests_info)."""
    import urllib.request

    srv, client, _base, _spec = server(servers, tmp_path_factory, "llama")
    client.upload("metrics-mam", tar_gz(FIXTURES / "adapterhub" / "llama-mam"))
    client.upload("metrics-soft", tar_gz(FIXTURES / "opendelta" / "llama-soft_prompt"))
    prompt = prompt_of("opendelta/llama-soft_prompt") * 2  # 22 tokens: 5 full blocks of 4 to reuse
    for name in ("metrics-mam", "metrics-mam", "metrics-soft"):
        generate(client, name, prompt, n=2)
    srv.idle()
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    samples = {k: float(v) for k, v in samples.items()}
    assert samples["deltaserve_prompt_prefix_computations_total"] >= 1
    assert samples["deltaserve_prefix_cache_lookups_total"] >= samples["deltaserve_prefix_cache_hits_total"] >= 5
    assert "deltaserve_prefix_cache_evictions_total" in samples and "deltaserve_kv_blocks_cached" in samples
    assert samples['deltaserve_requests_by_delta_kind_total{kind="prefix"}'] >= 1
    assert samples['deltaserve_requests_by_delta_kind_total{kind="prompt"}'] >= 1
    # the one series that names deltas is the router view's resident list (vllm:lora_requests_info, by design)
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and "metrics-soft@1" in info[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith("vllm:lora_requests_info{"))
    assert "metrics-mam" not in text and "metrics-soft" not in text
