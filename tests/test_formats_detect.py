"""detect_format, BitFit files (absolute / additive), native files, and key anchoring."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from delta_store import BaseMismatch, BaseSpec, DeltaError
from delta_store.delta import Delta, LoraTerm, ModuleDelta
from delta_store.formats import detect_format
from delta_store.formats.keys import KeyMapper, layer_of
from tests.helpers import FIXTURES, import_delta, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def gpt2():
    return BaseSpec.from_model(tiny_gpt2())


@pytest.fixture(scope="module")
def llama():
    return BaseSpec.from_model(tiny_llama())


def test_detect_each_format(tmp_path, gpt2):
    assert detect_format(FIXTURES / "adapterhub" / "llama-seq_bn") == "adapterhub"
    assert detect_format(FIXTURES / "opendelta" / "gpt2-bitfit") == "opendelta"
    save_file({"transformer.h.0.mlp.c_fc.bias": torch.zeros(256)}, str(tmp_path / "b.safetensors"))
    assert detect_format(tmp_path / "b.safetensors") == "bitfit"
    torch.save({"transformer.h.0.mlp.c_fc.bias": torch.zeros(256)}, tmp_path / "b.bin")
    assert detect_format(tmp_path / "b.bin") == "bitfit"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(DeltaError, match="full model checkpoint"):
        detect_format(tmp_path / "full")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaError, match="not a PEFT, AdapterHub or OpenDelta folder"):
        detect_format(tmp_path / "empty")
    with pytest.raises(DeltaError, match="no such file"):
        detect_format(tmp_path / "missing")


def test_native_round_trip_through_the_importer(tmp_path, llama):
    from delta_store.native import dump_native
    d = Delta({"model.layers.1.self_attn.q_proj": ModuleDelta(lora=LoraTerm(torch.randn(2, 64), torch.randn(64, 2), 0.5),
                                                              bias=torch.randn(64))}, source_format="peft")
    (tmp_path / "d.safetensors").write_bytes(dump_native(d))
    assert detect_format(tmp_path / "d.safetensors") == "native"
    got = import_delta(tmp_path / "d.safetensors", llama)
    assert got.base_fingerprint == llama.fingerprint
    torch.testing.assert_close(got.modules["model.layers.1.self_attn.q_proj"].lora.b, d.modules[
        "model.layers.1.self_attn.q_proj"].lora.b)
    d.base_fingerprint = "f" * 32  # validated against another base: FAILED_PRECONDITION, not served
    (tmp_path / "other.safetensors").write_bytes(dump_native(d))
    with pytest.raises(BaseMismatch):
        import_delta(tmp_path / "other.safetensors", llama)


def test_bitfit_absolute_and_additive(tmp_path, gpt2):
    p = "transformer.h.1.attn.c_attn"
    trained = gpt2.biases[p] + 0.25
    torch.save({f"{p}.bias": trained, "transformer.ln_f.bias": gpt2.biases["transformer.ln_f"]}, tmp_path / "abs.bin")
    d = import_delta(tmp_path / "abs.bin", gpt2)
    assert list(d.modules) == [p]  # ln_f unchanged: an exactly-zero delta is dropped
    torch.testing.assert_close(d.modules[p].bias, torch.full((192,), 0.25), atol=1e-6, rtol=0)
    save_file({f"{p}.bias": torch.full((192,), 0.25)}, str(tmp_path / "add.safetensors"),
              metadata={"bitfit_bias": "additive"})
    torch.testing.assert_close(import_delta(tmp_path / "add.safetensors", gpt2).modules[p].bias, torch.full((192,), 0.25))
    save_file({f"{p}.weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(DeltaError, match="not a bias"):
        import_delta(tmp_path / "w.safetensors", gpt2)
    save_file({f"{p}.bias": torch.zeros(64)}, str(tmp_path / "s.safetensors"))
    with pytest.raises(DeltaError, match=r"expected shape \(192,\).*found \(64,\)"):
        import_delta(tmp_path / "s.safetensors", gpt2)


def test_bitfit_on_bias_less_llama_is_the_value(tmp_path, llama):
    p = "model.layers.0.self_attn.o_proj"
    save_file({f"{p}.bias": torch.full((64,), 0.5)}, str(tmp_path / "b.safetensors"))
    torch.testing.assert_close(import_delta(tmp_path / "b.safetensors", llama).modules[p].bias, torch.full((64,), 0.5))


def test_key_mapper_anchors(llama, gpt2):
    km = KeyMapper(llama, "t")
    for foreign in ("model.layers.1.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.q_proj",
                    "layers.1.self_attn.q_proj", "model.language_model.layers.1.self_attn.q_proj"):
        assert km.find(foreign).path == "model.layers.1.self_attn.q_proj"
    assert km.find("model.layers.1.self_attn.z_proj") is None
    assert km.find("lm_head").path == "lm_head" and km.find("base_model.model.model.norm").path == "model.norm"
    kg = KeyMapper(gpt2, "t")
    assert kg.find("base_model.model.transformer.h.0.mlp.c_proj").path == "transformer.h.0.mlp.c_proj"
    assert kg.find("h.1.attn.c_proj").path == "transformer.h.1.attn.c_proj"
    assert kg.find("ln_f").path == "transformer.ln_f"
    assert kg.site_module(1, "ffn", key="k").path == "transformer.h.1.mlp.c_proj"
    assert km.site_module(0, "attn", key="k").path == "model.layers.0.self_attn.o_proj"
    with pytest.raises(DeltaError, match="names layer 5, but the served base has 2 layers"):
        km.module("model.layers.5.self_attn.q_proj", key="x.lora_A.weight")
    assert (layer_of("transformer.h.3"), layer_of("model.layers.12.mlp"), layer_of("lm_head")) == (3, 12, None)
