"""DoRA, VeRA, trainable tokens and OpenDelta-style kinds served by the wrapped model, live against PEFT: one
packed forward mixes them with plain LoRA, (IA)3, BitFit, bottleneck adapters and base-only rows, and every
row equals PEFT's own forward with that adapter active (fp32, 1e-5). Each adapter is made with PEFT, saved
and imported through the upload's import path (``tests.helpers.import_delta``)."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import BeftConfig, IA3Config, LoraConfig, TrainableTokensConfig, VeraConfig, get_peft_model

import kernels
from delta_store.base_spec import BaseSpec
from server.deltas import wrap_model
from tests.helpers import TOLERANCES, assert_close, import_delta, tiny_gpt2, tiny_llama
from tests.oracles import apply_delta, randomise_peft, site_adapters

ATOL = TOLERANCES[torch.float32]["atol"]
SEQ = 9
TOKENS = [3, 7, 11]  # trainable-token ids; every row's prompt contains some of them
BASES = {"llama": lambda: tiny_llama(seed=5), "gpt2": lambda: tiny_gpt2(seed=6),
         "mistral": lambda: tiny_llama(seed=8, model_type="mistral"),
         "qwen2": lambda: tiny_llama(seed=7, model_type="qwen2")}
CASES = {
    "llama": {
        "dora_mixed_ranks": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj",
                                               "down_proj"], rank_pattern={"down_proj": 8}),
        "dora_rslora_all": lambda: LoraConfig(r=2, lora_alpha=4, use_dora=True, use_rslora=True,
                                              target_modules="all-linear"),
        "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "down_proj", "v_proj"]),
        "tokens": lambda: TrainableTokensConfig(token_indices=TOKENS),
        "lora_with_tokens": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"],
                                               trainable_token_indices={"embed_tokens": [3, 9], "lm_head": [7, 9]}),
        "lora_r16": lambda: LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
        "ia3": lambda: IA3Config(),
        "beft": lambda: BeftConfig(target_modules=["v_proj", "down_proj"]),
    },
    "gpt2": {
        "dora_conv1d": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "mlp.c_proj"],
                                          rank_pattern={"c_attn": 2}),
        "dora_bias_all": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"],
                                            bias="all"),
        "vera": lambda: VeraConfig(r=8, target_modules=["c_attn", "c_fc"]),
        "tokens_tied": lambda: TrainableTokensConfig(token_indices=TOKENS),
        "lora_with_tokens": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                               trainable_token_indices=[3, 11]),
        "lora_r8": lambda: LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
        "ia3": lambda: IA3Config(),
    },
    "qwen2": {
        "dora_qkv_biases": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj",
                                                                                                "v_proj"]),
        "dora_lora_only": lambda: LoraConfig(r=2, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                                             bias="lora_only"),
        "lora_r4": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]),
    },
    "mistral": {
        "dora": lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj"]),
        "vera": lambda: VeraConfig(r=4, target_modules=["q_proj", "gate_proj"]),
        "ia3": lambda: IA3Config(),
    },
}


def _ids(rows: int, seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(12, 256, (rows, SEQ), generator=g)
    ids[:, 1], ids[:, 4], ids[:, SEQ - 1] = TOKENS[0], TOKENS[1], TOKENS[2]  # prompts with trained tokens
    return ids


def _peft_delta(base, cfg, seed: int, folder, spec: BaseSpec, std: float):
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomise_peft(pm, seed, std=std)
    pm.eval()
    pm.save_pretrained(folder)
    return import_delta(folder, spec), pm


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("arch", sorted(CASES))
def test_packed_batch_mixing_dora_vera_tokens_with_other_kinds_equals_peft(arch, tmp_path):
    base = BASES[arch]()
    spec = BaseSpec.from_model(base)
    names = list(CASES[arch])
    rows = ["none", *names, "adapters", "none", names[0]]  # base rows; a delta on two rows
    ids = _ids(len(rows))
    deltas, expected = {}, {}
    for i, name in enumerate(rows):
        row = ids[i:i + 1]
        if name == "none":
            expected[i] = _logits(base, row)
        elif name == "adapters":  # Houlsby after the FFN, parallel after attention; also an OpenDelta 'normed' one
            deltas[name] = site_adapters(spec, 3, {"ffn": ("output", "relu", 1.0, 4),
                                                   "attn": ("normed", "gelu_new", 1.0, 8)}, std=0.3)
            with torch.no_grad(), apply_delta(copy.deepcopy(base), deltas[name], spec) as model:
                expected[i] = model(input_ids=row).logits[0]
        else:
            if name not in deltas:
                std = 1.0 if name.startswith("vera") else 0.1  # VeRA's lambdas multiply fixed random matrices
                deltas[name], deltas[name + ":peft"] = _peft_delta(base, CASES[arch][name](), 100 + i,
                                                                   tmp_path / name, spec, std)
            expected[i] = _logits(deltas[name + ":peft"], row)
    with torch.no_grad():
        base_rows = base(input_ids=ids).logits
    served = {k: v for k, v in deltas.items() if not k.endswith(":peft")}
    dm = wrap_model(base, max_slots=len(served), max_rank=16, max_bottleneck=16)
    slot_of = {}
    for slot, (name, delta) in enumerate(reversed(list(served.items()))):  # slot order != row order
        dm.set_delta(slot, delta)
        slot_of[name] = slot
    dm.batch.prepare_sequences([slot_of.get(name, -1) for name in rows], [SEQ] * len(rows))
    with torch.no_grad():
        got = dm.model(input_ids=ids).logits
    for i, name in enumerate(rows):
        assert_close(got[i], expected[i], atol=ATOL, what=f"{arch} row {i} ({name})")
        if name != "none":
            assert (expected[i] - base_rows[i]).abs().max() > 1e-3, f"{arch} {name} is a no-op"


def test_dora_and_tokens_through_the_triton_ops_match_peft(tmp_path):
    """The same kinds through the Triton kernels (the interpreter on CPU): DoRA's column scale, the embedding
    rows and the tied head's logits, next to a plain LoRA row and a base row."""
    base = tiny_gpt2(seed=6)
    spec = BaseSpec.from_model(base)
    ids = _ids(4, seed=3)[:, :6]
    ids[:, 2] = TOKENS[1]
    dora, pm_dora = _peft_delta(base, CASES["gpt2"]["dora_conv1d"](), 1, tmp_path / "d", spec, 0.1)
    tokens, pm_tok = _peft_delta(base, CASES["gpt2"]["tokens_tied"](), 2, tmp_path / "t", spec, 0.1)
    lora, pm_lora = _peft_delta(base, CASES["gpt2"]["lora_r8"](), 3, tmp_path / "l", spec, 0.1)
    refs = [_logits(pm_dora, ids[0:1]), _logits(pm_tok, ids[1:2]), _logits(pm_lora, ids[2:3]), _logits(base, ids[3:4])]
    dm = wrap_model(base, max_slots=3, max_rank=16, max_bottleneck=16)
    for slot, d in enumerate((dora, tokens, lora)):
        dm.set_delta(slot, d)
    dm.batch.prepare_sequences([0, 1, 2, -1], [6] * 4)
    with torch.no_grad(), kernels.backend("triton"):
        got = dm.model(input_ids=ids).logits
    for i, ref in enumerate(refs):
        assert_close(got[i], ref, atol=ATOL, what=f"triton row {i}")


def test_head_rows_follow_logits_to_keep(tmp_path):
    """The engine computes logits only at kept positions: the head then reads ``head_meta`` for those rows."""
    base = tiny_gpt2(seed=6)
    spec = BaseSpec.from_model(base)
    tokens, pm = _peft_delta(base, CASES["gpt2"]["tokens_tied"](), 2, tmp_path / "t", spec, 0.1)
    ids = _ids(2, seed=5)[:, :6]  # [2, 6]: 12 tokens, the last position of each row kept
    want_base, want_tok = _logits(base, ids[0:1])[-1], _logits(pm, ids[1:2])[-1]
    assert (want_tok[TOKENS] - _logits(base, ids[1:2])[-1][TOKENS]).abs().max() > 1e-3  # the head does change
    dm = wrap_model(base, max_slots=2, max_rank=4, max_bottleneck=4)
    dm.set_delta(1, tokens)
    dm.batch.prepare_sequences([-1, 1], [6, 6], head_rows=[5, 11])
    with torch.no_grad():
        got = dm.model(input_ids=ids, logits_to_keep=torch.tensor([5])).logits[:, 0]  # [2, vocab]
    assert_close(got[0], want_base, atol=ATOL, what="base row")
    assert_close(got[1], want_tok, atol=ATOL, what="trainable-tokens row")
    dm.batch.prepare_sequences([-1, 1], [6, 6])  # head_rows not given: the head would see the wrong rows
    with torch.no_grad(), pytest.raises(Exception, match="pass head_rows"):
        dm.model(input_ids=ids, logits_to_keep=torch.tensor([5]))
