"""Greedy generation through the engine with DoRA, VeRA and trainable tokens equals PEFT's ``generate()`` token
for token, and the sampled tokens' logprobs agree with PEFT's logits, in staggered concurrent batches that mix
them with plain LoRA, bottleneck adapters, BitFit (BEFT / bias="all"), (IA)3 and no-delta requests.

Twelve requests arrive two per step (prompts of 4-24 tokens, each holding some trainable-token ids), through
the real residency owner (background loads, a budget of the 3 largest of 7 deltas: evictions too) and
wrap_model. References: the live PeftModel for every PEFT kind, forward hooks for the hand-made adapters
(tests/oracles.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import BeftConfig, IA3Config, LoraConfig, TrainableTokensConfig, VeraConfig, get_peft_model

from delta_store.base_spec import BaseSpec
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.deltas import wrap_model
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import residency_for, run_engine
from tests.helpers import import_delta, tiny_gpt2, tiny_llama
from tests.oracles import hooked_copy, randomise_peft, site_adapters

MAX_NEW = 8
TOKENS = [3, 7, 11]
LOGPROB_ATOL = 2e-5  # log_softmax of logits that agree within 1e-5
CASES = {
    "llama": {
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                   rank_pattern={"down_proj": 8}),
        "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "down_proj"]),
        "tokens": lambda: TrainableTokensConfig(token_indices=TOKENS),
        "lora": lambda: LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"]),
        "ia3": lambda: IA3Config(),
        "beft": lambda: BeftConfig(target_modules=["v_proj", "down_proj"]),
    },
    "gpt2": {
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "mlp.c_proj"],
                                   rank_pattern={"c_attn": 2}),
        "vera": lambda: VeraConfig(r=8, target_modules=["c_attn", "c_fc"]),
        "tokens": lambda: TrainableTokensConfig(token_indices=TOKENS),  # tied: the head's logits change too
        "lora": lambda: LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
        "ia3": lambda: IA3Config(),
        "bitfit": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], bias="all"),
    },
}
BASES = {"llama": lambda: tiny_llama(seed=21), "gpt2": lambda: tiny_gpt2(seed=22)}


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in torch.randint(4, 25, (n,), generator=g).tolist():
        p = torch.randint(12, 256, (k,), generator=g).tolist()
        p[k // 2], p[-1] = TOKENS[k % 3], TOKENS[(k + 1) % 3]
        out.append(p)
    return out


def _reference(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("arch", sorted(CASES))
def test_staggered_mixed_batches_equal_peft_generate(arch, tmp_path):
    base = BASES[arch]()
    spec = BaseSpec.from_model(base)
    deltas, refs = {}, {}
    for i, (name, make_cfg) in enumerate(CASES[arch].items()):
        pm = get_peft_model(copy.deepcopy(base), make_cfg())
        randomise_peft(pm, 200 + i, std=1.0 if name == "vera" else 0.15, ia3_std=0.3)
        pm.eval().save_pretrained(tmp_path / name)
        deltas[name], refs[name] = import_delta(tmp_path / name, spec), pm
    deltas["adapters"] = site_adapters(spec, 5, {"ffn": ("output", "relu", 1.0, 4),
                                                 "attn": ("normed", "gelu_new", 1.0, 8)}, std=0.3)
    refs["adapters"] = hooked_copy(base, deltas["adapters"], spec)
    rows = ["none", "dora", "tokens", "vera", "lora", "adapters", list(CASES[arch])[-1], "ia3", "dora", "none",
            "tokens", "vera"]
    prompts = _prompts(len(rows), seed=3)
    expected = [_reference(base if name == "none" else refs[name], p) for name, p in zip(rows, prompts)]
    changed = [n for n, p, e in zip(rows, prompts, expected) if n != "none" and e[0] != _reference(base, p)[0]]
    assert set(changed) >= {"dora", "tokens", "vera"}, f"deltas that leave greedy output unchanged: {changed}"

    config = ServerConfig(max_batch_tokens=40, max_running=16, kv_block_size=4, kv_blocks=256, max_model_len=64)
    served = copy.deepcopy(base)
    dm = wrap_model(served, max_slots=config.max_running, max_rank=16, max_bottleneck=16)  # as the server does
    slots = residency_for(dm, deltas, hold=3)  # the 3 largest of 7 deltas at once: evictions
    engine = Engine(config, ModelRunner(dm, None, config), slots)
    requests = [GenerationRequest(f"r{i}", f"tenant{i % 3}", p,
                                  SamplingParams(max_new_tokens=MAX_NEW, temperature=0, logprobs=True),
                                  delta=None if name == "none" else DeltaKey("t", name, 1, name))
                for i, (name, p) in enumerate(zip(rows, prompts))]
    logprobs: dict[str, list[float]] = {}
    got = run_engine(engine, requests, per_step=2, logprobs=logprobs)
    for i, name in enumerate(rows):
        want_tokens, want_lp = expected[i]
        assert got[f"r{i}"] == want_tokens, f"request {i} ({name}, prompt {len(prompts[i])} tokens)"
        assert torch.allclose(torch.tensor(logprobs[f"r{i}"]), torch.tensor(want_lp), atol=LOGPROB_ATOL, rtol=0), \
            f"request {i} ({name}): logprobs {logprobs[f'r{i}']} vs {want_lp}"
    engine.step()  # the owner's step after the last request: it unpins what nothing runs
    assert slots.stats().evictions > 0 and slots.stats().pinned == 0
    assert engine.runner.kv.allocator.num_used == 0
    slots.close()
