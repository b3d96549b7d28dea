"""Greedy generation through the engine equals HF ``generate()`` token for token.

Ten requests arrive two per step with prompts of 3-30 tokens; they use deltas of every kind (LoRA of ranks 2,
4 and 16, LoRA + BitFit bias, (IA)3, BEFT bias, bottleneck adapters) or none, one delta shared by two requests.
Each delta is made with PEFT (random weights, saved, imported with ``import_delta``, the store's import path: the upload path) and served
through the real residency owner (background loads, a byte budget) and wrap_model. References: PEFT ``merge_and_unload`` for LoRA
and (IA)3, the unmerged PeftModel for BEFT, and forward hooks applying the adapters for the bottleneck delta.
The same run with a KV cache of 14 blocks of 4 tokens forces preemption (recompute) and must not change a token.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import BeftConfig, IA3Config, LoraConfig, get_peft_model

from delta_store.base_spec import BaseSpec
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.deltas import wrap_model
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.deltas.residency import Residency
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import run_engine
from tests.helpers import import_delta, tiny_gpt2, tiny_llama
from tests.oracles import hooked_copy, randomise_peft, site_adapters

MAX_NEW = 10
PEFT_CASES = {
    "lora_qv_r2": (lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), "merge"),
    "lora_all_r16": (lambda: LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"), "merge"),
    "lora_r4_bias": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                                        lora_bias=True), "live"),  # no base bias: PEFT cannot merge
    "ia3": (lambda: IA3Config(), "merge"),
    "beft": (lambda: BeftConfig(target_modules=["v_proj", "down_proj"]), "live"),
}
ROWS = ["none", "lora_qv_r2", "lora_all_r16", "ia3", "adapters", "lora_r4_bias", "beft", "none", "lora_qv_r2",
        "lora_all_r16"]


def _make_deltas(base, names, tmp_path):
    """name -> (Delta, reference model for generate())."""
    spec = BaseSpec.from_model(base)
    out = {}
    for i, name in enumerate(sorted(set(names) - {"none"})):
        if name == "adapters":
            delta = site_adapters(spec, 3, {"ffn": ("output", "relu", 1.0, 4), "attn": ("residual", "gelu", 2.0, 8)},
                                      std=0.3)  # Houlsby-style after the FFN, parallel after attention
            out[name] = (delta, hooked_copy(base, delta, spec))
            continue
        make_cfg, how = PEFT_CASES[name]
        pm = get_peft_model(copy.deepcopy(base), make_cfg())
        randomise_peft(pm, 100 + i, std=0.15, ia3_std=0.3)
        pm.eval()
        pm.save_pretrained(tmp_path / name)
        delta = import_delta(tmp_path / name, spec)
        out[name] = (delta, pm.merge_and_unload() if how == "merge" else pm)
    return out


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 31, (n,), generator=g).tolist()
    return [torch.randint(3, 256, (k,), generator=g).tolist() for k in lengths]


def _reference(model, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _serve(base, deltas: dict, config: ServerConfig, num_slots: int):
    """The engine with a delta budget that holds the ``num_slots`` largest deltas (fewer than there are: evictions)."""
    dm = wrap_model(base, max_slots=config.max_running, max_rank=16, max_bottleneck=16)
    by_name = {name: d for name, (d, _) in deltas.items()}
    budget = sum(sorted((dm.footprint(d) for d in by_name.values()), reverse=True)[:num_slots])
    slots = Residency(dm, lambda key: by_name[key.name], budget)
    return Engine(config, ModelRunner(dm, None, config), slots), slots


@pytest.mark.parametrize("kv_blocks", [256, 14], ids=["roomy", "preempting"])
def test_mixed_deltas_greedy_equals_hf_generate(tmp_path, kv_blocks):
    base = tiny_llama(seed=5)
    prompts = _prompts(len(ROWS))
    deltas = _make_deltas(base, ROWS, tmp_path)
    expected = [_reference(base if name == "none" else deltas[name][1], p) for name, p in zip(ROWS, prompts)]
    changed = [name for name, p, e in zip(ROWS, prompts, expected) if name != "none" and e != _reference(base, p)]
    assert len(changed) == sum(name != "none" for name in ROWS), f"some deltas do not change greedy output: {changed}"
    config = ServerConfig(max_batch_tokens=48, max_running=16, kv_block_size=4, kv_blocks=kv_blocks,
                          max_model_len=64)
    engine, slots = _serve(copy.deepcopy(base), deltas, config, num_slots=4)  # 6 deltas, room for 4: eviction too
    requests = [GenerationRequest(f"r{i}", f"tenant{i % 3}", p, SamplingParams(max_new_tokens=MAX_NEW, temperature=0),
                                  delta=None if name == "none" else DeltaKey("t", name, 1, name))
                for i, (name, p) in enumerate(zip(ROWS, prompts))]
    got = run_engine(engine, requests)
    for i, name in enumerate(ROWS):
        assert got[f"r{i}"] == expected[i], f"request {i} ({name}, prompt {len(prompts[i])} tokens)"
    if kv_blocks == 14:
        assert engine.scheduler.num_preemptions > 0, "the small KV budget was meant to force preemption"
    assert engine.runner.kv.allocator.num_used == 0
    engine.step()  # the owner's step after the last request: it unpins what nothing runs
    assert slots.stats().pinned == 0
    slots.close()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "mistral"])
def test_base_greedy_equals_hf_generate_other_archs(arch):
    base = {"gpt2": lambda: tiny_gpt2(seed=2), "qwen2": lambda: tiny_llama(seed=3, model_type="qwen2"),
            "mistral": lambda: tiny_llama(seed=4, model_type="mistral")}[arch]()
    prompts = _prompts(8, seed=7)
    expected = [_reference(base, p) for p in prompts]
    config = ServerConfig(max_batch_tokens=32, max_running=8, kv_block_size=8, kv_blocks=64, max_model_len=64)
    engine = Engine(config, ModelRunner(copy.deepcopy(base), None, config))
    requests = [GenerationRequest(f"r{i}", "t", p, SamplingParams(max_new_tokens=MAX_NEW, temperature=0))
                for i, p in enumerate(prompts)]
    got = run_engine(engine, requests, per_step=3)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    assert engine.runner.kv.allocator.num_used == 0


def test_gpt2_conv1d_deltas_equal_hf_generate(tmp_path):
    """GPT-2's Conv1D layers and fused c_attn: LoRA (merged by PEFT) and (IA)3 rows beside base rows."""
    base = tiny_gpt2(seed=8)
    cases = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
             "ia3": IA3Config(fan_in_fan_out=True)}
    spec = BaseSpec.from_model(base)
    deltas = {}
    for i, (name, cfg) in enumerate(cases.items()):
        pm = get_peft_model(copy.deepcopy(base), cfg)
        randomise_peft(pm, 40 + i, std=0.15, ia3_std=0.3)
        pm.eval()
        pm.save_pretrained(tmp_path / name)
        deltas[name] = (import_delta(tmp_path / name, spec), pm.merge_and_unload())
    rows = ["lora", "none", "ia3", "lora", "none", "ia3", "lora", "none"]
    prompts = _prompts(len(rows), seed=9)
    expected = [_reference(base if n == "none" else deltas[n][1], p) for n, p in zip(rows, prompts)]
    changed = [n for n, p, e in zip(rows, prompts, expected) if n != "none" and e != _reference(base, p)]
    assert set(changed) == {"lora", "ia3"}, changed  # each delta changes greedy output of some prompt
    config = ServerConfig(max_batch_tokens=32, max_running=8, kv_block_size=8, kv_blocks=64, max_model_len=64)
    engine, slots = _serve(copy.deepcopy(base), deltas, config, num_slots=2)
    requests = [GenerationRequest(f"r{i}", "t", p, SamplingParams(max_new_tokens=MAX_NEW, temperature=0),
                                  delta=None if n == "none" else DeltaKey("t", n, 1, n))
                for i, (n, p) in enumerate(zip(rows, prompts))]
    got = run_engine(engine, requests, per_step=3)
    assert [got[f"r{i}"] for i in range(len(rows))] == expected
    engine.step()  # the owner's step after the last request: it unpins what nothing runs
    assert engine.runner.kv.allocator.num_used == 0 and slots.stats().pinned == 0
    slots.close()
