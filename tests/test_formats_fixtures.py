"""Every AdapterHub / OpenDelta reference case converts, and the converted Delta reproduces the
library's logits (tests/fixtures/README.md: fp32, atol 1e-5) through the functional application."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from delta_store import BaseSpec
from delta_store.formats import detect_format
from tests.helpers import FIXTURES, fixture_cases, import_delta
from tests.oracles import apply_delta

CASES = fixture_cases(prompt=False)  # the prompt/prefix cases: tests/test_formats_prompt_fixtures.py
_BASES: dict[str, tuple] = {}


def base(arch: str):
    if arch not in _BASES:
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / arch, dtype=torch.float32).eval()
        _BASES[arch] = (model, BaseSpec.from_model(model))
    return _BASES[arch]


def test_every_case_is_covered():
    assert len(CASES) == 23, [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_converts_and_matches_library_logits(case):
    meta = json.loads((case / "case.json").read_text())
    model, spec = base(meta["base"].split("/")[-1])
    assert detect_format(case) == case.parent.name
    delta = import_delta(case, spec)
    want = load_file(str(case / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(want["input_ids"]).logits, want["base_logits"], atol=2e-6, rtol=0)
        with apply_delta(model, delta, spec):
            got = model(want["input_ids"], attention_mask=want["attention_mask"]).logits
    torch.testing.assert_close(got, want["logits"], atol=1e-5, rtol=0)


def test_placements_and_kinds():
    _, spec_l = base("llama")
    _, spec_g = base("gpt2")
    ah, od = FIXTURES / "adapterhub", FIXTURES / "opendelta"
    seq = import_delta(ah / "llama-seq_bn", spec_l)
    assert list(seq.modules) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert seq.modules["model.layers.0.mlp.down_proj"].adapter.source == "output+residual"
    dbl = import_delta(ah / "gpt2-double_seq_bn", spec_g).modules["transformer.h.1.attn.c_proj"].adapter
    assert (dbl.source, dbl.activation, dbl.width) == ("output", "silu", 4)
    par = import_delta(ah / "llama-par_bn", spec_l).modules["model.layers.1.mlp.down_proj"].adapter
    assert (par.source, par.scale, par.width) == ("residual", 4.0, 32)
    ia3 = import_delta(ah / "llama-ia3", spec_l)
    assert ia3.modules["model.layers.0.mlp.down_proj"].out_scale.shape == (64,)  # output scaling, unlike PEFT
    assert import_delta(ah / "llama-lora", spec_l).modules["model.layers.0.mlp.down_proj"].lora.scale == 2.0
    bit = import_delta(od / "gpt2-bitfit", spec_g)
    assert "transformer.ln_f" in bit.modules and bit.kinds() == {"bitfit"}
    p = "transformer.h.0.attn.c_attn"
    stored = torch.load(od / "gpt2-bitfit" / "pytorch_model.bin", weights_only=True)[f"{p}.bias"]
    torch.testing.assert_close(bit.modules[p].bias, stored - spec_g.biases[p])  # delta, not the absolute value
    oad = import_delta(od / "llama-adapter", spec_l).modules["model.layers.0.self_attn.o_proj"].adapter
    assert (oad.source, oad.activation, oad.width) == ("output", "gelu_new", 8)


def test_expanded_kinds_land_on_the_library_placements():
    """Compacter / low-rank / parallel adapters arrive as ordinary bottleneck terms with the producing
    library's placement and activation (the logits test above checks the numbers)."""
    _, spec_l = base("llama")
    _, spec_g = base("gpt2")
    ah, od = FIXTURES / "adapterhub", FIXTURES / "opendelta"
    cases = {  # case -> (spec, module, source, activation, width, number of adapters)
        ah / "llama-compacter": (spec_l, "model.layers.1.self_attn.o_proj", "output", "gelu", 8, 4),
        ah / "gpt2-compacter_pp": (spec_g, "transformer.h.0.mlp.c_proj", "output+residual", "gelu", 8, 2),
        od / "llama-compacter": (spec_l, "model.layers.0.mlp.down_proj", "output", "gelu_new", 8, 4),
        od / "gpt2-low_rank_adapter": (spec_g, "transformer.h.1.attn.c_proj", "output", "gelu_new", 8, 4),
        od / "llama-parallel_adapter": (spec_l, "model.layers.0.self_attn.o_proj", "normed", "gelu_new", 8, 4),
        od / "gpt2-parallel_adapter": (spec_g, "transformer.h.1.mlp.c_proj", "normed", "gelu_new", 8, 4),
    }
    for case, (spec, path, source, act, width, count) in cases.items():
        delta = import_delta(case, spec)
        assert delta.kinds() == {"bottleneck"} and len(delta.modules) == count, case.name
        ad = delta.modules[path].adapter
        assert (ad.source, ad.activation, ad.width, ad.scale) == (source, act, width, 1.0), case.name
    # the PHM expansion itself: M = sum_k kron(rule[k], W_left[k] @ W_right[k]), Linear weight M^T
    raw = torch.load(od / "llama-compacter" / "pytorch_model.bin", weights_only=True)
    p = "model.layers.0.mlp.down_proj.compactor.down_sampler"
    m = sum(torch.kron(raw[f"{p}.phm_rule"][k], raw[f"{p}.W_left"][k] @ raw[f"{p}.W_right"][k]) for k in range(4))
    got = import_delta(od / "llama-compacter", spec_l).modules["model.layers.0.mlp.down_proj"].adapter.down
    torch.testing.assert_close(got, m.T)
    # the rank-1 low-rank projection: W_left * W_right broadcasts into the outer product
    raw = torch.load(od / "gpt2-low_rank_adapter" / "pytorch_model.bin", weights_only=True)
    p = "transformer.h.0.attn.c_proj.low_rank_adapter.up_sampler"
    got = import_delta(od / "gpt2-low_rank_adapter", spec_g).modules["transformer.h.0.attn.c_proj"].adapter.up
    torch.testing.assert_close(got, (raw[f"{p}.W_left"] * raw[f"{p}.W_right"]).T)
