"""PEFT prompt learning, live: prompt tuning, P-tuning (MLP and LSTM encoders), CPT, prefix tuning (with and
without ``prefix_projection``) and CARTRIDGE, made with PEFT on Llama, Qwen2, Mistral and GPT-2, saved with
``save_pretrained`` and imported as a tenant's upload is. The imported delta's no-cache application
(``tests.oracles.prompt_forward``) equals PEFT's own ``forward()`` at every real position (fp32, 1e-5):
the layout of the flat K/V tensor, the grouped-query head count and the shifted positions are PEFT's."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import (CartridgeConfig, CPTConfig, PrefixTuningConfig, PromptEncoderConfig,
                  PromptEncoderReparameterizationType, PromptTuningConfig, TaskType, get_peft_model)

from delta_store import BaseSpec, DeltaError
from tests.helpers import assert_close, import_delta, tiny_gpt2, tiny_llama
from tests.oracles import prompt_forward, randomise_peft

ATOL = 1e-5
N = 4  # virtual tokens
KINDS = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N),
    "p_tuning_mlp": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N,
                                                encoder_hidden_size=24),
    "p_tuning_lstm": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N,
                                                 encoder_hidden_size=24,
                                                 encoder_reparameterization_type=PromptEncoderReparameterizationType.LSTM),
    "cpt": lambda: CPTConfig(task_type=TaskType.CAUSAL_LM, cpt_token_ids=[5, 6, 7, 8], cpt_mask=[1, 1, 1, 1],
                             cpt_tokens_type_mask=[1, 2, 2, 2]),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N),
    "prefix_projection": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N,
                                                    prefix_projection=True, encoder_hidden_size=24),
    "cartridge": lambda: CartridgeConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N),
}
BASES = {"llama": lambda: tiny_llama(seed=21), "qwen2": lambda: tiny_llama(seed=22, model_type="qwen2"),
         "mistral": lambda: tiny_llama(seed=23, model_type="mistral"), "gpt2": lambda: tiny_gpt2(seed=24)}
_BASES: dict[str, tuple] = {}


def base(arch: str):
    if arch not in _BASES:
        model = BASES[arch]()
        _BASES[arch] = (model, BaseSpec.from_model(model))
    return _BASES[arch]


def make(arch: str, kind: str, folder, seed: int = 0):
    """(imported Delta, live PeftModel in eval mode) for one PEFT prompt-learning config."""
    model, spec = base(arch)
    pm = get_peft_model(copy.deepcopy(model), KINDS[kind]())
    randomise_peft(pm, seed, std=0.5)  # PEFT's own inits are small; 0.5 makes the prefix matter (see below)
    pm.eval()
    pm.save_pretrained(folder)
    return import_delta(folder, spec), pm


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", list(BASES))
def test_imported_prompt_equals_peft_forward(tmp_path, arch, kind):
    model, spec = base(arch)
    delta, pm = make(arch, kind, tmp_path / kind)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = prompt_forward(model, delta, spec, ids)
        plain = model(input_ids=ids).logits
    n = delta.num_virtual_tokens
    assert n == N
    if delta.prompt.form == "embeddings":
        assert want.shape[1] == n + ids.shape[1]  # PEFT returns the virtual positions' logits too
        want = want[:, n:]
    assert_close(got, want, atol=ATOL, what=f"{arch} {kind}")
    assert (want - plain).abs().max() > 0.05, "the prompt part must change the output"
    assert delta.prompt.positions == "after_prefix"  # PEFT shifts the real tokens by N, every kind
    if delta.prompt.form == "kv":
        assert tuple(delta.prompt.keys.shape) == (spec.num_layers, n, spec.num_kv_heads, spec.head_dim)


def test_gqa_prefix_layout_is_peft_get_prompt(tmp_path):
    """Llama with 2 KV heads for 4 query heads: PEFT's cache layer i holds [B, n_kv, N, head_dim] keys."""
    delta, pm = make("llama", "prefix", tmp_path / "p")
    cache = pm.get_prompt(batch_size=1)
    for layer in range(2):
        k, v = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [n_kv, N, head_dim]
        assert torch.equal(delta.prompt.keys[layer], k.permute(1, 0, 2))
        assert torch.equal(delta.prompt.values[layer], v.permute(1, 0, 2))


def test_init_fields_only_describe_initialisation(tmp_path):
    """prompt_tuning_init TEXT + its text/tokenizer fields change nothing about the saved embeddings."""
    delta, _ = make("llama", "prompt_tuning", tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify the sentiment",
               tokenizer_name_or_path="some/tokenizer")
    cfg_path.write_text(json.dumps(cfg))
    again = import_delta(tmp_path / "a", base("llama")[1])
    assert torch.equal(again.prompt.embeddings, delta.prompt.embeddings)


@pytest.mark.parametrize("field,value,message", [
    ("num_layers", 4, "num_layers 4, the served llama base has 2 layers"),
    ("num_attention_heads", 4, "num_attention_heads 4 = 4 KV heads of size 8.*2 KV heads of size 16"),
    ("token_dim", 64, "token_dim 64 / num_attention_heads 2"),
    ("num_virtual_tokens", 5, "does not hold num_virtual_tokens 5 rows"),
    ("num_transformer_submodules", 2, "encoder-decoder"),
])
def test_prefix_config_for_another_geometry_is_refused(tmp_path, field, value, message):
    make("llama", "prefix", tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DeltaError, match=message):
        import_delta(tmp_path / "p", base("llama")[1])


def test_prefix_made_without_the_gqa_rule_is_refused_with_the_reason(tmp_path):
    """A prefix sized for every query head (token_dim = hidden, as PEFT before its GQA rule wrote it)."""
    from safetensors.torch import save_file

    make("llama", "prefix", tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(token_dim=64, num_attention_heads=4)
    cfg_path.write_text(json.dumps(cfg))
    save_file({"prompt_embeddings": torch.zeros(N, 2 * 2 * 64)}, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(DeltaError, match="grouped-query attention.*does not fit the KV cache"):
        import_delta(tmp_path / "p", base("llama")[1])


def test_prompt_embeddings_for_another_hidden_size_is_refused(tmp_path):
    from safetensors.torch import save_file

    make("gpt2", "prompt_tuning", tmp_path / "p")
    save_file({"prompt_embeddings": torch.zeros(N, 768)}, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(DeltaError, match=r"shape \(4, 768\), expected \[4, 64\]"):
        import_delta(tmp_path / "p", base("gpt2")[1])
