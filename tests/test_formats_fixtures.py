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
from tests.helpers import FIXTURES, import_delta
from tests.oracles import apply_delta

CASES = sorted(p for lib in ("adapterhub", "opendelta") for p in (FIXTURES / lib).iterdir() if p.is_dir())
_BASES: dict[str, tuple] = {}


def base(arch: str):
    if arch not in _BASES:
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / arch, dtype=torch.float32).eval()
        _BASES[arch] = (model, BaseSpec.from_model(model))
    return _BASES[arch]


def test_every_case_is_covered():
    assert len(CASES) == 13, [c.name for c in CASES]


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
