"""AdapterHub and OpenDelta prompt/prefix cases through the engine (tests/fixtures/README.md): at every position
the library's logits cover, the engine's logits match within 1e-5 (fp32).

Each fixture row (11 tokens) is asked at every prompt length k = 1..11 for one greedy token, so the k-th
request's logits must be the library's ``logits[row, k - 1]``: AdapterHub prefix tuning (MLP and flat) and
OpenDelta prefix keep the real tokens at positions 0.., the soft prompts shift them by P, and MAM adds its
parallel adapter in the same forward. The layer-only cases of the same base run in the same batches (full
prompts), as does the bare base. Requests of one delta share the delta's prefix blocks and, with prefix
caching, the blocks of their common first tokens.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from delta_store.base_spec import BaseSpec
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.deltas import wrap_model
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import LogitsRunner, residency_for, run_engine_logits
from tests.helpers import FIXTURES, assert_close, fixture_cases, import_delta


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_fixture_cases_through_the_engine(arch):
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / arch, dtype=torch.float32).eval()
    spec = BaseSpec.from_model(base)
    prompt_cases = [c for c in fixture_cases(arch, prompt=True) if not c.name.endswith("-unipelt")]
    layer_cases = fixture_cases(arch, prompt=False)
    name = lambda c: f"{c.parent.name}-{c.name}"  # noqa: E731 - AdapterHub and OpenDelta share case names
    deltas = {name(c): import_delta(c, spec) for c in prompt_cases + layer_cases}
    dm = wrap_model(base, max_slots=len(deltas), max_rank=16, max_bottleneck=64)
    slots = residency_for(dm, deltas)
    config = ServerConfig(max_batch_tokens=96, max_running=48, kv_block_size=4, kv_blocks=512, max_model_len=32)
    engine = Engine(config, LogitsRunner(ModelRunner(dm, None, config)), slots)
    sampling = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    requests, expected = [], {}
    for case in prompt_cases + layer_cases + [None]:
        want = load_file(str((case or prompt_cases[0]) / "expected.safetensors"))
        ids = want["input_ids"]
        lengths = range(1, ids.shape[1] + 1) if case in prompt_cases else [ids.shape[1]]
        for r in range(ids.shape[0]):
            for k in lengths:
                rid = f"{name(case) if case else 'base'}/{r}/{k}"
                key = None if case is None else DeltaKey("t", name(case), 1, f"digest-{name(case)}")
                requests.append(GenerationRequest(rid, f"t{r}", ids[r, :k].tolist(), sampling, delta=key))
                expected[rid] = want["logits" if case else "base_logits"][r, k - 1]
    got = run_engine_logits(engine, requests, per_step=12)
    for rid, want in expected.items():
        assert_close(got[rid][1][0], want, atol=1e-5, what=f"{arch} {rid}")
    assert engine.prefix.stats.prompt_computes == len(prompt_cases)
    assert engine.prefix.stats.hits > 0  # the rows' growing prompts share their first blocks
    engine.step()  # the owner's step after the last request: it unpins what nothing runs
    assert engine.runner.kv.allocator.num_used == 0 and slots.stats().pinned == 0
    slots.close()
