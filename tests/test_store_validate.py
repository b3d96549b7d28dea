"""validate(): targets, shapes, kinds per module, residual sites, limits, finiteness, fingerprints."""
from __future__ import annotations

import pytest
import torch

from delta_store import BaseMismatch, BaseSpec, DeltaError
from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from delta_store.validate import Limits, validate
from tests.helpers import tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return BaseSpec.from_model(tiny_llama())


@pytest.fixture(scope="module")
def gpt2():
    return BaseSpec.from_model(tiny_gpt2())


def lora(r, fin, fout, scale=2.0):
    return LoraTerm(torch.randn(r, fin), torch.randn(fout, r), scale)


def adapter(h, m, source="output"):
    return AdapterTerm(torch.randn(m, h), torch.zeros(m), torch.randn(h, m), torch.zeros(h), "relu", 1.0, source)


def test_valid_deltas_pass(llama, gpt2):
    validate(Delta({"model.layers.0.self_attn.v_proj": ModuleDelta(lora=lora(4, 64, 32), bias=torch.zeros(32)),
                    "model.layers.1.mlp.down_proj": ModuleDelta(in_scale=torch.ones(128),
                                                                adapter=adapter(64, 4, "output+residual"))}), llama)
    # GPT-2 Conv1D in/out come from its [in, out] weight: c_fc is 64 -> 256
    validate(Delta({"transformer.h.0.mlp.c_fc": ModuleDelta(lora=lora(2, 64, 256), out_scale=torch.ones(256)),
                    "transformer.h.1.attn.c_proj": ModuleDelta(adapter=adapter(64, 8, "residual")),
                    "transformer.ln_f": ModuleDelta(bias=torch.zeros(64))}), gpt2)


@pytest.mark.parametrize("path,md,match", [
    ("model.layers.0.self_attn.x_proj", ModuleDelta(bias=torch.zeros(64)), "not a module"),
    ("model.layers.0.self_attn.v_proj", ModuleDelta(lora=lora(4, 64, 64)), r"lora.b expected shape \(32, 4\), found \(64, 4\)"),
    ("model.layers.0.self_attn.v_proj", ModuleDelta(lora=lora(4, 32, 32)), r"lora.a expected shape \(4, 64\), found \(4, 32\)"),
    ("model.layers.0.mlp.down_proj", ModuleDelta(bias=torch.zeros(128)), r"bias expected shape \(64,\), found \(128,\)"),
    ("model.layers.0.mlp.down_proj", ModuleDelta(in_scale=torch.ones(64)), r"in_scale expected shape \(128,\)"),
    ("model.layers.0.mlp.down_proj", ModuleDelta(out_scale=torch.ones(128)), r"out_scale expected shape \(64,\)"),
    ("model.layers.0.mlp.down_proj", ModuleDelta(adapter=adapter(128, 4)), r"adapter.down expected shape \(4, 64\)"),
    ("model.layers.0.input_layernorm", ModuleDelta(bias=torch.zeros(64)), "rmsnorm module cannot take a bias"),
    ("model.layers.0.input_layernorm", ModuleDelta(out_scale=torch.ones(64)), "only takes a bias"),
    ("model.layers.0.self_attn.q_proj", ModuleDelta(adapter=adapter(64, 4, "residual")), "residual-site output"),
    ("model.layers.0.self_attn.q_proj", ModuleDelta(lora=LoraTerm(torch.randn(2, 64), torch.randn(64, 2), float("inf"))),
     "not finite"),
])
def test_errors_name_module_expected_and_found(llama, path, md, match):
    with pytest.raises(DeltaError, match=match) as info:
        validate(Delta({path: md}), llama)
    assert path in str(info.value)


def test_nan_values_refused(llama):
    bias = torch.zeros(32)
    bias[3] = float("nan")
    with pytest.raises(DeltaError, match="v_proj.bias: tensor holds NaN"):
        validate(Delta({"model.layers.0.self_attn.v_proj": ModuleDelta(bias=bias)}), llama)


def test_limits(llama):
    d = Delta({"model.layers.0.self_attn.q_proj": ModuleDelta(lora=lora(16, 64, 64))})
    validate(d, llama, Limits(max_rank=16))
    with pytest.raises(DeltaError, match="rank 16 exceeds the server's max_rank 8"):
        validate(d, llama, Limits(max_rank=8))
    a = Delta({"model.layers.0.mlp.down_proj": ModuleDelta(adapter=adapter(64, 32))})
    with pytest.raises(DeltaError, match="width 32 exceeds the server's max_bottleneck 16"):
        validate(a, llama, Limits(max_bottleneck=16))
    with pytest.raises(DeltaError, match="dtype torch.float32 not allowed"):
        validate(d, llama, Limits(dtypes=(torch.float16,)))
    with pytest.raises(DeltaError, match="bytes exceeds the per-tensor limit 100"):
        validate(d, llama, Limits(max_tensor_bytes=100))
    with pytest.raises(ValueError, match="max_rank"):
        Limits(max_rank=0)


def test_a_delta_larger_than_the_device_budget_is_refused_naming_module_rank_and_limit(llama):
    d = Delta({"model.layers.0.self_attn.q_proj": ModuleDelta(lora=lora(4, 64, 64)),
               "model.layers.1.mlp.up_proj": ModuleDelta(lora=lora(16, 64, 128)),
               "model.layers.1.self_attn.k_proj": ModuleDelta(bias=torch.zeros(32))})
    nbytes = d.nbytes()
    validate(d, llama, Limits(device_bytes=lambda x: x.nbytes(), device_budget_bytes=nbytes))  # fits exactly
    with pytest.raises(DeltaError) as err:
        validate(d, llama, Limits(device_bytes=lambda x: x.nbytes() + 1, device_budget_bytes=nbytes))
    msg = str(err.value)
    assert msg.startswith("model.layers.1.mlp.up_proj: LoRA rank 16 (the largest of 3 modules)"), msg
    assert f"needs {nbytes + 1} bytes of device memory" in msg and f"delta_memory_bytes={nbytes}" in msg
    with pytest.raises(ValueError, match="needs device_bytes"):
        Limits(device_budget_bytes=5)


def test_fingerprint_mismatch_and_empty(llama):
    d = Delta({"model.layers.0.self_attn.q_proj": ModuleDelta(bias=torch.ones(64))}, base_fingerprint="0" * 32)
    with pytest.raises(BaseMismatch, match="built for base 0000"):
        validate(d, llama)
    d.base_fingerprint = llama.fingerprint
    validate(d, llama)
    with pytest.raises(DeltaError, match="no terms"):
        validate(Delta({}), llama)
