"""Automatic prefix caching and shared prompt prefixes through the engine, counted.

Blocks of 4 tokens: two requests of one delta whose prompts share 12 tokens (3 full blocks) compute those
blocks once; the same tokens under another delta, or another version of the same delta (another content
digest), share nothing; outputs are those of an engine with caching off: the same tokens exactly, and the
same logits within 1e-5 (not bit for bit: a cached block's K/V came from another forward, whose matmul
shapes differ, and BLAS rounds them differently, 6e-7 here). A cancelled request never frees the prefix
blocks a running request of the same delta reads.
"""
from __future__ import annotations

import copy
import time

import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

from delta_store.base_spec import BaseSpec
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.deltas import wrap_model
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.stats import StepStats
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import LogitsRunner, residency_for
from tests.helpers import assert_close, import_delta, tiny_llama
from tests.oracles import randomise_peft

SHARED = list(range(40, 52))  # 12 tokens = 3 blocks of 4
SAMPLING = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)


def _deltas(tmp_path):
    base = tiny_llama(seed=41)
    spec = BaseSpec.from_model(base)
    out = {}
    for i, (name, cfg) in enumerate({
            "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "lora_v2": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "other": LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]),
            "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6)}.items()):
        pm = get_peft_model(copy.deepcopy(base), cfg)
        randomise_peft(pm, 60 + i, std=0.3)
        pm.eval().save_pretrained(tmp_path / name)
        out[name] = import_delta(tmp_path / name, spec)
    return base, out


class Served:
    def __init__(self, base, deltas, *, caching: bool):
        config = ServerConfig(max_batch_tokens=64, max_running=8, kv_block_size=4, kv_blocks=128, max_model_len=64,
                              prefix_caching=caching)
        self.dm = wrap_model(copy.deepcopy(base), max_slots=4, max_rank=8)
        self.slots = residency_for(self.dm, deltas, hold=4)
        self.engine = Engine(config, LogitsRunner(ModelRunner(self.dm, None, config)), self.slots)
        self.computed = 0  # tokens that went through a forward
        self.engine.add_listener(lambda s: self._count(s) if isinstance(s, StepStats) else None)

    def _count(self, s: StepStats) -> None:
        self.computed += s.num_tokens

    def run(self, rid: str, tokens: list[int], key: DeltaKey | None):
        """Serve one request to the end on its own; (tokens computed by its forwards, output, logits)."""
        before = self.computed
        live = self.engine.add_request(GenerationRequest(rid, "t", tokens, SAMPLING, delta=key))
        out = []
        while self.engine.scheduler.has_work():
            out += [t for o in self.engine.step() for t in o.token_ids]
        return self.computed - before, out, torch.stack(self.engine.runner.logits[id(live.row)])


def _key(name: str, digest: str | None = None) -> DeltaKey:
    return DeltaKey("t", name.removesuffix("_v2"), 2 if name.endswith("_v2") else 1, digest or f"sha-{name}")


def test_shared_blocks_are_computed_once_per_delta_and_version(tmp_path):
    base, deltas = _deltas(tmp_path)
    on, off = Served(base, deltas, caching=True), Served(base, deltas, caching=False)
    prompts = {"a": SHARED + [7, 8, 9], "b": SHARED + [10, 11, 12, 13, 14]}
    # same delta: the second request computes only what follows the 3 shared blocks (+ its new tokens' decode)
    n_a, out_a, log_a = on.run("a", prompts["a"], _key("lora"))
    n_b, out_b, log_b = on.run("b", prompts["b"], _key("lora"))
    decode = SAMPLING.max_new_tokens - 1
    assert n_a == len(prompts["a"]) + decode
    assert n_b == len(prompts["b"]) - 12 + decode, "the 12 shared tokens were computed again"
    assert on.engine.prefix.stats.hits == 3
    # another delta, or another version of the same name (another digest): nothing shared
    n_c, _, _ = on.run("c", prompts["b"], _key("other"))
    n_d, out_d, log_d = on.run("d", prompts["b"], _key("lora_v2"))
    assert n_c == n_d == len(prompts["b"]) + decode and on.engine.prefix.stats.hits == 3
    # outputs equal an engine that caches nothing
    for rid, key, out, logits in (("a", _key("lora"), out_a, log_a), ("b", _key("lora"), out_b, log_b),
                                  ("d", _key("lora_v2"), out_d, log_d)):
        n_ref, ref_out, ref_logits = off.run(rid, prompts[rid if rid != "d" else "b"], key)
        assert out == ref_out, rid
        assert_close(logits, ref_logits, atol=1e-5, what=rid)
    assert off.engine.prefix.stats.lookups == 0
    for s in (on, off):
        assert s.engine.runner.kv.allocator.num_used == 0
        s.slots.close()


def test_prompt_prefix_shared_and_cached_tokens_behind_it(tmp_path):
    """A prefix delta (6 virtual tokens: a full block and a 2-row tail): its prefix is computed when it is
    installed, once; a second request reuses it and the cached blocks of the tokens both share."""
    base, deltas = _deltas(tmp_path)
    on, off = Served(base, deltas, caching=True), Served(base, deltas, caching=False)
    first, second = SHARED + [1, 2], SHARED + [3]
    n1, out1, log1 = on.run("p1", first, _key("prefix"))
    n2, out2, log2 = on.run("p2", second, _key("prefix"))
    stats = on.engine.prefix.stats
    # computed once: on install, or by p1's admission when the load landed inside that step; p2 reuses it
    assert stats.prompt_computes == 1 and stats.prompt_hits >= 1
    decode = SAMPLING.max_new_tokens - 1
    assert n1 == len(first) + decode
    # slots: 6 virtual + 12 shared = 18 = 4 full blocks + 2 rows; blocks 1..3 hold shared tokens (block 1 mixes
    # the prefix's 2-row tail with the first 2 tokens), so only the last 2 shared tokens and the new one are computed
    assert n2 == 2 + 1 + decode and stats.hits == 3
    for rid, prompt, out, logits in (("p1", first, out1, log1), ("p2", second, out2, log2)):
        _, ref_out, ref_logits = off.run(rid, prompt, _key("prefix"))
        assert out == ref_out, rid
        assert_close(logits, ref_logits, atol=1e-5, what=rid)
    for s in (on, off):
        s.slots.close()


def test_cancelling_one_request_keeps_the_shared_prefix_of_another(tmp_path):
    base, deltas = _deltas(tmp_path)
    solo = Served(base, deltas, caching=True)
    _, want, want_logits = solo.run("ref", [5, 6, 7], _key("prefix"))
    solo.slots.close()
    s = Served(base, deltas, caching=True)
    pool = s.engine.runner.kv.allocator
    a = s.engine.add_request(GenerationRequest("a", "t", [5, 6, 7], SAMPLING, delta=_key("prefix")))
    b = s.engine.add_request(GenerationRequest("b", "t", [9, 9, 9, 9], SAMPLING, delta=_key("prefix")))
    out = []
    for _ in range(2000):  # the delta loads in the background; then both are admitted in one step
        out += [t for o in s.engine.step() for t in o.token_ids if o.request_id == "a"]
        if a.seq.block_table and b.seq.block_table:
            break
        time.sleep(0.002)
    shared = a.seq.block_table[0]
    assert b.seq.block_table[0] == shared and pool.refs(shared) == 2
    assert s.engine.abort("b")
    assert pool.refs(shared) == 1, "cancelling b must not free the prefix a reads"
    while s.engine.scheduler.has_work():
        out += [t for o in s.engine.step() for t in o.token_ids if o.request_id == "a"]
    assert out == want
    assert_close(torch.stack(s.engine.runner.logits[id(a.row)]), want_logits, atol=1e-5, what="a after b's abort")
    assert pool.num_used == 0 and pool.num_cached > 0  # idle prefix kept, evictable
    s.slots.close()
