"""One test per refusal class: what cannot be served faithfully is refused, naming the reason."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from delta_store import BaseSpec, DeltaError, UnsupportedDelta
from tests.helpers import FIXTURES, import_delta, tiny_llama


@pytest.fixture(scope="module")
def spec():
    return BaseSpec.from_model(tiny_llama())


@pytest.fixture(scope="module")
def llama_spec():
    from transformers import AutoModelForCausalLM
    return BaseSpec.from_model(AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / "llama"))


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft")
    get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


def edited(src, dst, *, config=None, tensors=None, cfg_name="adapter_config.json", weights=None):
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / cfg_name).read_text())
        config(cfg)
        (dst / cfg_name).write_text(json.dumps(cfg))
    if tensors is not None:
        path = dst / weights
        sd = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        tensors(sd)
        save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save(sd, path)
    return dst


PEFT_CONFIG_REFUSALS = [
    ("dora_lora_bias", {"use_dora": True, "lora_bias": True}, "PEFT refuses"),
    ("dora_variant", {"use_dora": "kernel"}, "not a DoRA variant"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, "full-weight"),
    ("pissa", {"init_lora_weights": "pissa_niter_4"}, "mutated base"),
    ("olora", {"init_lora_weights": "olora"}, "mutated base"),
    ("loftq", {"init_lora_weights": "loftq"}, "mutated base"),
    ("multitask_prompt", {"peft_type": "MULTITASK_PROMPT_TUNING"}, "task id per request"),
    ("adaption_prompt", {"peft_type": "ADAPTION_PROMPT"}, "gated softmax"),
    ("enable_lora", {"enable_lora": [True, False, True]}, "MergedLinear"),
    ("layer_replication", {"layer_replication": [[0, 2], [1, 2]]}, "duplicates base layers"),
    ("target_parameters", {"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
    ("variant", {"alora_invocation_tokens": [5, 6]}, "LoRA variant"),
    ("lokr", {"peft_type": "LOKR"}, "LOKR is not supported: LoKr.s update kron.*Kronecker product"),
    ("loha", {"peft_type": "LOHA"}, "LOHA is not supported: LoHa's update .* Hadamard"),
    ("oft", {"peft_type": "OFT"}, "OFT is not supported: OFT multiplies the base weight"),
    ("boft", {"peft_type": "BOFT"}, "BOFT is not supported: BOFT multiplies the base weight"),
    ("fourierft", {"peft_type": "FOURIERFT"}, "FOURIERFT is not supported: .*inverse 2-D FFT"),
    ("unknown_method", {"peft_type": "NOT_A_METHOD"}, r"not supported \(supported: LORA"),
]


@pytest.mark.parametrize("name,change,reason", PEFT_CONFIG_REFUSALS, ids=[c[0] for c in PEFT_CONFIG_REFUSALS])
def test_peft_config_refusals(tmp_path, peft_dir, spec, name, change, reason):
    folder = edited(peft_dir, tmp_path / name, config=lambda c: c.update(change))
    with pytest.raises(UnsupportedDelta, match=reason):
        import_delta(folder, spec)


PEFT_TENSOR_REFUSALS = [
    ("dora_vector_without_use_dora", "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64,),
     DeltaError, "use_dora=False but the file has a lora_magnitude_vector"),
    ("embedding_weight", "base_model.model.model.embed_tokens.base_layer.weight", (256, 64), UnsupportedDelta,
     "full weight"),
    ("lm_head_weight", "base_model.model.lm_head.weight", (256, 64), UnsupportedDelta, "full weight"),
    ("prompt", "prompt_embeddings", (3, 64), DeltaError, "LORA adapter holding prompt_embeddings"),
    ("unknown_key", "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", (2, 2), DeltaError, "lora_C"),
    ("untargeted", "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", (2, 64), DeltaError, "do not target"),
    ("missing_module", "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", (2, 64), DeltaError,
     "layer 7"),
]


@pytest.mark.parametrize("name,key,shape,err,reason", PEFT_TENSOR_REFUSALS, ids=[c[0] for c in PEFT_TENSOR_REFUSALS])
def test_peft_tensor_refusals(tmp_path, peft_dir, spec, name, key, shape, err, reason):
    def add(sd):
        sd[key] = torch.ones(shape)
        if name in ("untargeted", "missing_module"):
            sd[key.replace("lora_A", "lora_B")] = torch.ones(shape[::-1] if name != "missing_module" else (64, 2))
    folder = edited(peft_dir, tmp_path / name, tensors=add, weights="adapter_model.safetensors")
    with pytest.raises(err, match=reason):
        import_delta(folder, spec)


def test_peft_rank_disagreeing_with_config(tmp_path, peft_dir, spec):
    folder = edited(peft_dir, tmp_path / "r", config=lambda c: c.update(r=3))
    with pytest.raises(DeltaError, match="config says rank 3.*lora_A has rank 2"):
        import_delta(folder, spec)


def test_pickle_with_code_is_never_run(tmp_path, spec):
    class Boom:
        def __reduce__(self):
            return (exec, ("open('/tmp/deltaserve_pwned', 'w').write('x')",))
    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"model.layers.0.self_attn.q_proj.bias": Boom()}))
    with pytest.raises(DeltaError, match="unsafe pickle, never loaded"):
        import_delta(tmp_path / "evil.bin", spec)
    import os
    assert not os.path.exists("/tmp/deltaserve_pwned")


AH_REFUSALS = [
    ("gating", {"use_gating": True}, "not causal"),
    ("post_add", {"residual_before_ln": "post_add"}, "post_add"),
    ("ln_before", {"ln_before": True}, "LayerNorm"),
    ("ln_after", {"ln_after": True}, "LayerNorm"),
    ("drops_residual", {"original_ln_after": False}, "residual stream"),
    ("activation", {"non_linearity": "leakyrelu"}, "non_linearity"),
    ("prompt_tuning", {"architecture": "prompt_tuning"}, "no library result to match"),
    ("gated_union", {"architecture": "union", "configs": [{"architecture": "lora", "use_gating": True}]},
     "UniPELT.*not causal"),
    ("union_member", {"architecture": "union", "configs": [{"architecture": "reft"}]}, "member of architecture"),
]


@pytest.mark.parametrize("name,change,reason", AH_REFUSALS, ids=[c[0] for c in AH_REFUSALS])
def test_adapterhub_refusals(tmp_path, llama_spec, name, change, reason):
    folder = edited(FIXTURES / "adapterhub" / "llama-seq_bn", tmp_path / name,
                    config=lambda c: c["config"].update(change))
    with pytest.raises(UnsupportedDelta, match=reason):
        import_delta(folder, llama_spec)


def test_adapterhub_lora_refusals(tmp_path, llama_spec):
    for name, change, reason in (("gating", {"use_gating": True}, "not causal"), ("dora", {"use_dora": True}, "DoRA"),
                                 ("vera", {"vera_d": 0.1}, "VeRA")):
        folder = edited(FIXTURES / "adapterhub" / "llama-lora", tmp_path / name,
                        config=lambda c: c["config"].update(change))
        with pytest.raises(UnsupportedDelta, match=reason):
            import_delta(folder, llama_spec)


def test_adapterhub_flexible_head_refused_default_head_ignored(tmp_path, llama_spec):
    src = FIXTURES / "adapterhub" / "llama-seq_bn"
    assert import_delta(src, llama_spec).kinds() == {"bottleneck"}  # head_config with config null: ignored
    folder = edited(src, tmp_path / "head", cfg_name="head_config.json",
                    config=lambda c: c.update(config={"head_type": "causal_lm", "layers": 2}))
    with pytest.raises(UnsupportedDelta, match="prediction head"):
        import_delta(folder, llama_spec)
    (folder / "head_config.json").unlink()
    with pytest.raises(UnsupportedDelta, match="pytorch_model_head.bin without head_config.json"):
        import_delta(folder, llama_spec)


def test_adapterhub_tensor_outside_config_refused(tmp_path, llama_spec):
    def add(sd):
        sd["model.layers.0.attention_adapters.adapters.delta.adapter_up.bias"] = torch.zeros(64)
    folder = edited(FIXTURES / "adapterhub" / "llama-seq_bn", tmp_path / "x", tensors=add,
                    weights="pytorch_adapter.bin")
    with pytest.raises(DeltaError, match="does not create"):
        import_delta(folder, llama_spec)


@pytest.mark.parametrize("kind,reason", [("prefix", "GPT-2 attention only"), ("lora_old", "not supported")])
def test_opendelta_unsupported_types(tmp_path, llama_spec, kind, reason):
    folder = edited(FIXTURES / "opendelta" / "llama-lora", tmp_path / kind, cfg_name="config.json",
                    config=lambda c: c.update(delta_type=kind))
    with pytest.raises(UnsupportedDelta, match=reason):
        import_delta(folder, llama_spec)


def test_opendelta_whole_model_save_refused(tmp_path, llama_spec):
    def add(sd):
        sd["lm_head.weight"] = torch.zeros(256, 64)
    folder = edited(FIXTURES / "opendelta" / "llama-lora", tmp_path / "whole", tensors=add, weights="pytorch_model.bin")
    with pytest.raises(UnsupportedDelta, match="whole-model save"):
        import_delta(folder, llama_spec)
