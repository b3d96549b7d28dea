"""PEFT (0.21.2, live in the test) -> Delta: resolved scales, orientations, bias deltas, numerics."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from delta_store import BaseSpec, DeltaError
from delta_store.formats import detect_format
from tests.helpers import import_delta, tiny_gpt2, tiny_llama
from tests.oracles import apply_delta

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))


def make_peft(model, cfg, folder, *, perturb_biases=False, seed=0):
    """get_peft_model + seeded random adapter values (PEFT zero-inits lora_B, a no-op) + save."""
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif any(s in name for s in ("lora_", "beft_bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif perturb_biases and name.endswith(".bias") and p.requires_grad:  # what training could change
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.eval()
    pm.save_pretrained(folder)
    return pm


def check_parity(pm, fresh, folder, atol=1e-5):
    spec = BaseSpec.from_model(fresh)
    delta = import_delta(folder, spec)
    with torch.no_grad(), apply_delta(fresh, delta, spec):
        ours = fresh(IDS).logits
    with torch.no_grad():
        theirs = pm(IDS).logits
        base = fresh(IDS).logits
    assert (theirs - base).abs().max() > 1e-3, "the adapter is a no-op; the test would prove nothing"
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    return delta, spec


def lora_layers(pm):
    from peft.tuners.lora import LoraLayer
    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def test_lora_rank_and_alpha_patterns_llama(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 16})
    pm = make_peft(tiny_llama(), cfg, tmp_path)
    assert detect_format(tmp_path) == "peft"
    delta, _ = check_parity(pm, tiny_llama(), tmp_path)
    layers = lora_layers(pm)
    assert set(delta.modules) == set(layers)
    for path, layer in layers.items():
        lt = delta.modules[path].lora
        assert lt.scale == pytest.approx(layer.scaling["default"], rel=1e-12), path
        torch.testing.assert_close(lt.scale * lt.b @ lt.a, layer.get_delta_weight("default"))
    assert delta.modules["model.layers.1.self_attn.q_proj"].lora.scale == 4.0
    assert delta.modules["model.layers.0.mlp.down_proj"].lora.scale == 4.0
    assert delta.modules["model.layers.0.self_attn.v_proj"].lora.scale == 2.0
    assert delta.source_format == "peft" and delta.base_fingerprint


def test_rslora_all_linear_layers_to_transform(tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=4, use_rslora=True, layers_to_transform=[1], layers_pattern="layers",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     rank_pattern={"gate_proj": 2})
    pm = make_peft(tiny_llama(), cfg, tmp_path)
    delta, _ = check_parity(pm, tiny_llama(), tmp_path)
    assert all(p.startswith("model.layers.1.") for p in delta.modules) and len(delta.modules) == 7
    for path, layer in lora_layers(pm).items():
        assert delta.modules[path].lora.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
    assert delta.modules["model.layers.1.mlp.gate_proj"].lora.scale == pytest.approx(4 / math.sqrt(2))
    assert delta.modules["model.layers.1.self_attn.q_proj"].lora.scale == pytest.approx(4 / math.sqrt(8))


def test_gpt2_conv1d_bias_all_and_lora_bias(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], bias="all", lora_bias=True)
    pm = make_peft(tiny_gpt2(), cfg, tmp_path, perturb_biases=True)
    fresh = tiny_gpt2()
    delta, spec = check_parity(pm, fresh, tmp_path)
    for path, layer in lora_layers(pm).items():
        lt = delta.modules[path].lora
        # Conv1D: same A [r,in] / B [out,r] as Linear; only PEFT's merged weight is transposed ([in, out])
        assert spec.modules[path].kind == "conv1d"
        assert lt.a.shape == (4, spec.modules[path].in_features)
        assert lt.b.shape == (spec.modules[path].out_features, 4)
        torch.testing.assert_close((lt.scale * lt.b @ lt.a).T, layer.get_delta_weight("default"))
    # bias deltas are trained - base (not the absolute values), lora_B bias folded in with the scale
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "transformer.h.0.mlp.c_fc"
    torch.testing.assert_close(delta.modules[p].bias, sd[f"base_model.model.{p}.bias"] - spec.biases[p])
    p = "transformer.h.1.attn.c_attn"
    want = sd[f"base_model.model.{p}.base_layer.bias"] - spec.biases[p] + 2.0 * sd[f"base_model.model.{p}.lora_B.bias"]
    torch.testing.assert_close(delta.modules[p].bias, want)
    assert "transformer.ln_f" in delta.modules and "transformer.h.0.ln_1" in delta.modules


def test_gpt2_lora_only_and_pre_0_7_bias_spelling(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["c_fc"], bias="lora_only")
    pm = make_peft(tiny_gpt2(), cfg, tmp_path, perturb_biases=True)
    delta, _ = check_parity(pm, tiny_gpt2(), tmp_path)
    assert sorted(delta.modules) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    # PEFT <= 0.6 spelled the bias P.bias (no base_layer) and wrote adapter_model.bin
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    old = {k.replace(".base_layer.bias", ".bias"): v for k, v in sd.items()}
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(old, tmp_path / "adapter_model.bin")
    spec = BaseSpec.from_model(tiny_gpt2())
    again = import_delta(tmp_path, spec)
    for p, md in delta.modules.items():
        torch.testing.assert_close(again.modules[p].bias, md.bias)
        torch.testing.assert_close(again.modules[p].lora.a, md.lora.a)


def test_ia3_llama_input_and_output_scaling(tmp_path):
    pm = make_peft(tiny_llama(), IA3Config(), tmp_path)
    delta, _ = check_parity(pm, tiny_llama(), tmp_path)
    md = delta.modules["model.layers.0.mlp.down_proj"]
    assert md.in_scale.shape == (128,) and md.out_scale is None  # feed-forward: input scaled
    md = delta.modules["model.layers.0.self_attn.k_proj"]
    assert md.out_scale.shape == (32,) and md.in_scale is None  # GQA: k out = 2 kv heads * 16


def test_ia3_gpt2_scales_bias_too(tmp_path):
    pm = make_peft(tiny_gpt2(), IA3Config(), tmp_path)
    delta, _ = check_parity(pm, tiny_gpt2(), tmp_path)
    assert delta.modules["transformer.h.0.attn.c_attn"].out_scale.shape == (192,)
    assert delta.modules["transformer.h.0.mlp.c_proj"].in_scale.shape == (256,)


def test_beft_is_additive(tmp_path):
    from peft.tuners.beft import BeftConfig
    pm = make_peft(tiny_llama(model_type="qwen2"), BeftConfig(target_modules=["v_proj", "o_proj"]), tmp_path)
    delta, spec = check_parity(pm, tiny_llama(model_type="qwen2"), tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "model.layers.0.self_attn.v_proj"  # Qwen2 v_proj has a base bias: BEFT adds to it, no subtraction
    assert spec.modules[p].has_bias
    torch.testing.assert_close(delta.modules[p].bias, sd[f"base_model.model.{p}.beft_bias"].reshape(-1))


def test_adalora_scale_and_singular_values(tmp_path):
    cfg = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, total_step=10, target_modules=["q_proj", "up_proj"])
    pm = make_peft(tiny_llama(), cfg, tmp_path)
    delta, _ = check_parity(pm, tiny_llama(), tmp_path)
    assert delta.modules["model.layers.0.self_attn.q_proj"].lora.scale == pytest.approx(8 / 6, rel=1e-5)


def test_multi_adapter_folder(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("second", LoraConfig(r=4, target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "all")
    spec = BaseSpec.from_model(tiny_llama())
    first = import_delta(tmp_path / "all", spec)
    second = import_delta(tmp_path / "all" / "second", spec)
    assert {p.rsplit(".", 1)[1] for p in first.modules} == {"q_proj"}
    assert {p.rsplit(".", 1)[1] for p in second.modules} == {"v_proj"}
    # a root holding only subfolders: an error that lists them
    root = tmp_path / "only"
    (root / "a").mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "a" / f).write_bytes((tmp_path / "all" / "second" / f).read_bytes())
    (root / "b").mkdir()
    (root / "b" / "adapter_config.json").write_bytes((tmp_path / "all" / "adapter_config.json").read_bytes())
    with pytest.raises(DeltaError, match=r"several PEFT adapters.*a, b"):
        import_delta(root, spec)


def test_keys_anchor_on_layer_index_not_prefix(tmp_path):
    """A LoRA trained on a bare LlamaModel (keys base_model.model.layers...) or a VLM text tower maps too."""
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    pm = make_peft(tiny_llama(), cfg, tmp_path / "a")
    spec = BaseSpec.from_model(tiny_llama())
    ref = import_delta(tmp_path / "a", spec)
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for prefix in ("base_model.model.layers.", "base_model.model.model.language_model.layers."):
        folder = tmp_path / prefix.replace(".", "_")
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((tmp_path / "a" / "adapter_config.json").read_bytes())
        save_file({k.replace("base_model.model.model.layers.", prefix): v for k, v in sd.items()},
                  str(folder / "adapter_model.safetensors"))
        got = import_delta(folder, spec)
        assert list(got.modules) == list(ref.modules)
        for p in ref.modules:
            torch.testing.assert_close(got.modules[p].lora.b, ref.modules[p].lora.b)
    del pm


def test_fp16_file_keeps_its_dtype(tmp_path):
    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    make_peft(tiny_llama(), cfg, tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "adapter_model.safetensors"))
    delta = import_delta(tmp_path, BaseSpec.from_model(tiny_llama()))
    assert {md.lora.a.dtype for md in delta.modules.values()} == {torch.float16}


def test_loading_does_not_mutate_the_spec(tmp_path):
    """One spec serves many loads (the store builds it once); loading must not mutate it."""
    spec = BaseSpec.from_model(tiny_gpt2())
    before = copy.deepcopy(spec.biases)
    make_peft(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="all"), tmp_path, perturb_biases=True)
    import_delta(tmp_path, spec)
    for k, v in before.items():
        assert torch.equal(spec.biases[k], v)


def test_lora_only_without_biases_is_flagged(tmp_path):
    """PEFT 0.7-0.20 saved no biases for bias="lora_only" (issue #3306): served as LoRA, but flagged."""
    make_peft(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_fc"], bias="lora_only"), tmp_path, perturb_biases=True)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.endswith(".bias")}, str(tmp_path / "adapter_model.safetensors"))
    delta = import_delta(tmp_path, BaseSpec.from_model(tiny_gpt2()))
    assert delta.kinds() == {"lora"} and "trained biases are missing" in delta.description


def test_qwen2_bias_all_on_qkv_biases(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"], bias="all")
    pm = make_peft(tiny_llama(model_type="qwen2"), cfg, tmp_path, perturb_biases=True)
    delta, spec = check_parity(pm, tiny_llama(model_type="qwen2"), tmp_path)
    assert delta.modules["model.layers.0.self_attn.v_proj"].bias is not None  # untargeted, bias still trained
    assert delta.modules["model.layers.0.self_attn.o_proj"].bias is None  # Qwen2 o_proj has no bias at all


def test_targeting_and_pattern_rules():
    from delta_store.formats.peft_config import is_feedforward, is_targeted, lora_scale
    key = "model.layers.1.self_attn.q_proj"
    assert is_targeted({"target_modules": ["q_proj"]}, key)
    assert is_targeted({"target_modules": [key]}, key)
    assert not is_targeted({"target_modules": ["proj"]}, key)  # dot boundary
    assert is_targeted({"target_modules": r".*\.1\..*q_proj"}, key)
    assert is_targeted({"target_modules": r".*q_proj", "layers_to_transform": [0]}, key)  # ignored for a regex
    assert not is_targeted({"target_modules": ["q_proj"], "exclude_modules": ["self_attn.q_proj"]}, key)
    assert not is_targeted({"target_modules": ["q_proj"], "exclude_modules": r"model\.layers\.1\..*"}, key)
    assert is_targeted({"target_modules": ["q_proj"], "layers_to_transform": 1}, key)
    assert not is_targeted({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["h", "layers"]},
                           key)
    assert is_feedforward({"feedforward_modules": ["mlp.c_proj"]}, "transformer.h.0.mlp.c_proj")
    assert is_feedforward({"feedforward_modules": ["proj"]}, "model.layers.0.mlp.down_proj")  # no dot boundary
    assert not is_feedforward({"feedforward_modules": ["mlp.c_proj"]}, "transformer.h.0.attn.c_proj")
    # patterns: dot-boundary suffix regexes, first match in dict order wins; "^q_proj" never matches
    cfg = {"r": 8, "lora_alpha": 8, "rank_pattern": {"^q_proj": 2, r"layers\.1\.self_attn\.q_proj": 4, "q_proj": 6},
           "alpha_pattern": {"self_attn.q_proj": 2, "q_proj": 100}}
    assert lora_scale(cfg, key, 4, where="t") == 0.5
    with pytest.raises(DeltaError, match="config says rank 6"):
        lora_scale(cfg, "model.layers.0.self_attn.q_proj", 4, where="t")
