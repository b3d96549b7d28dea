"""Prompt tuning, P-tuning and prefix tuning (with and without projection) through the engine equal PEFT, live.

Per base (Llama with grouped-query attention, Qwen2, GPT-2), PEFT makes one adapter of each prompt-learning
kind (random weights, saved, imported as an upload is) plus a LoRA; a hand-made bottleneck delta and the
bare base join them. Twelve requests with prompts of 3-30 tokens arrive two per step and are served in
mixed batches: every kind and no delta in one forward. The reference is a greedy loop over PEFT's
full-sequence ``forward()`` (``tests.oracles.peft_greedy``; PEFT's ``generate()`` is wrong for prompt
learning under transformers 5.24): the tokens must be equal and the logits each token was chosen from
within 1e-5 (fp32). Virtual-token counts 3, 5, 6 and 8 against blocks of 4 rows cover a prefix that ends
inside a block (its tail copied into each request's own block) and one that ends on a boundary. The same
requests run again with a KV cache small enough to force preemption by recompute, with 8-token prefill
chunks, and with prefix caching off.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

from delta_store.base_spec import BaseSpec
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.deltas import wrap_model
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import LogitsRunner, residency_for, run_engine_logits
from tests.helpers import assert_close, import_delta, tiny_gpt2, tiny_llama
from tests.oracles import hooked_copy, peft_greedy, randomise_peft, site_adapters

MAX_NEW = 8
KINDS = {
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    "p_tuning": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
    "prefix_proj": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8,
                                              prefix_projection=True, encoder_hidden_size=16),
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
}
ROWS = ["prompt", "prefix", "none", "p_tuning", "lora", "prefix_proj", "adapters", "prefix", "prompt", "none",
        "prefix_proj", "p_tuning"]
BASES = {"llama": lambda: tiny_llama(seed=31), "qwen2": lambda: tiny_llama(seed=32, model_type="qwen2"),
         "gpt2": lambda: tiny_gpt2(seed=33)}
CONFIGS = {
    "roomy": dict(max_batch_tokens=64, max_running=16, kv_blocks=256),
    "preempting_chunked": dict(max_batch_tokens=8, max_running=8, kv_blocks=22),
    "no_prefix_caching": dict(max_batch_tokens=64, max_running=16, kv_blocks=256, prefix_caching=False),
}
_REFS: dict[str, tuple] = {}


def _prompts(n: int, seed: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 31, (n,), generator=g).tolist()
    return [torch.randint(3, 250, (k,), generator=g).tolist() for k in lengths]


def _references(arch: str, tmp_path_factory):
    """(base, deltas by name, expected (tokens, logits) per row): built once per arch."""
    if arch in _REFS:
        return _REFS[arch]
    base = BASES[arch]()
    spec = BaseSpec.from_model(base)
    folder = tmp_path_factory.mktemp(arch)
    deltas, models = {}, {"none": base}
    for i, (name, make) in enumerate(KINDS.items()):
        pm = get_peft_model(copy.deepcopy(base), make())
        randomise_peft(pm, 300 + i, std=0.5 if name != "lora" else 0.15)
        pm.eval()
        pm.save_pretrained(folder / name)
        deltas[name] = import_delta(folder / name, spec)
        models[name] = pm
    adapters = site_adapters(spec, 9, {"ffn": ("output+residual", "relu", 1.0, 8)}, std=0.3)
    deltas["adapters"], models["adapters"] = adapters, hooked_copy(base, adapters, spec)
    prompts = _prompts(len(ROWS))
    expected = [peft_greedy(models[name], p, MAX_NEW) for name, p in zip(ROWS, prompts)]
    plain = [peft_greedy(base, p, MAX_NEW)[0] for p in prompts]
    same = [name for name, (tok, _), pl in zip(ROWS, expected, plain) if name != "none" and tok == pl]
    assert not same, f"these deltas do not change the greedy output, the test would not see them: {same}"
    _REFS[arch] = (base, deltas, prompts, expected)
    return _REFS[arch]


@pytest.mark.parametrize("setup", list(CONFIGS))
@pytest.mark.parametrize("arch", list(BASES))
def test_prompt_deltas_in_mixed_batches_equal_peft(arch, setup, tmp_path_factory):
    base, deltas, prompts, expected = _references(arch, tmp_path_factory)
    config = ServerConfig(kv_block_size=4, max_model_len=64, **CONFIGS[setup])
    dm = wrap_model(copy.deepcopy(base), max_slots=8, max_rank=8, max_bottleneck=8)
    slots = residency_for(dm, deltas, hold=8)
    engine = Engine(config, LogitsRunner(ModelRunner(dm, None, config)), slots)
    sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)  # the oracle runs past EOS
    requests = [GenerationRequest(f"r{i}", f"tenant{i % 3}", p, sampling,
                                  delta=None if name == "none" else DeltaKey("t", name, 1, f"digest-{name}"))
                for i, (name, p) in enumerate(zip(ROWS, prompts))]
    got = run_engine_logits(engine, requests)
    for i, name in enumerate(ROWS):
        tokens, logits = got[f"r{i}"]
        want_tokens, want_logits = expected[i]
        what = f"{arch} {setup} request {i} ({name}, prompt {len(prompts[i])} tokens)"
        assert tokens == want_tokens, what
        assert_close(logits, want_logits, atol=1e-5, what=what)
    stats = engine.prefix.stats
    if setup == "preempting_chunked":
        assert engine.scheduler.num_preemptions > 0, "the small KV budget was meant to force preemption"
        # idle prefixes were evicted for running requests' blocks and computed again when needed
        assert stats.prompt_computes >= 4 and engine.runner.kv.allocator.evictions > 0
    else:
        assert stats.prompt_computes == 4, "each prompt delta's prefix is computed once (its load), then shared"
    engine.step()  # the owner's step after the last request: it unpins what nothing runs
    assert engine.runner.kv.allocator.num_used == 0 and slots.stats().pinned == 0
    slots.close()
