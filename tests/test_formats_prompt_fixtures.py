"""AdapterHub / OpenDelta prompt and prefix cases (tests/fixtures/README.md, "added kinds"): each converts
into a delta with a prompt part whose no-cache application (``tests.oracles.prompt_forward``) reproduces
the library's logits at every real position (fp32, atol 1e-5), and the position policy that makes the
libraries differ is the one that matters: the other policy misses by far more than the tolerance.
UniPELT is refused, and the fixtures' ``prefix_logits`` show why (its output at position k depends on
tokens after k)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from delta_store import BaseSpec, DeltaError, UnsupportedDelta
from delta_store.prompt import PromptPart
from tests.helpers import FIXTURES, assert_close, fixture_cases, import_delta
from tests.oracles import prompt_forward

ATOL = 1e-5
CASES = [c for c in fixture_cases(prompt=True) if not c.name.endswith("-unipelt")]
UNIPELT = [c for c in fixture_cases(prompt=True) if c.name.endswith("-unipelt")]
_BASES: dict[str, tuple] = {}


def base(arch: str):
    if arch not in _BASES:
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / arch, dtype=torch.float32).eval()
        _BASES[arch] = (model, BaseSpec.from_model(model))
    return _BASES[arch]


def _arch(case) -> str:
    return case.name.split("-", 1)[0]


def test_the_prompt_cases_are_all_here():
    names = sorted(f"{c.parent.name}/{c.name}" for c in CASES + UNIPELT)
    assert names == ["adapterhub/gpt2-mam", "adapterhub/gpt2-prefix_tuning", "adapterhub/gpt2-prefix_tuning_flat",
                     "adapterhub/gpt2-unipelt", "adapterhub/llama-mam", "adapterhub/llama-prefix_tuning",
                     "adapterhub/llama-prefix_tuning_flat", "adapterhub/llama-unipelt", "opendelta/gpt2-prefix",
                     "opendelta/gpt2-soft_prompt", "opendelta/llama-soft_prompt"]


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_prompt_case_matches_library_logits(case):
    model, spec = base(_arch(case))
    delta = import_delta(case, spec)
    want = load_file(str(case / "expected.safetensors"))
    with torch.no_grad():
        got = prompt_forward(model, delta, spec, want["input_ids"])
    assert_close(got, want["logits"], atol=ATOL, what=case.name)
    # the other position policy (real tokens shifted / not shifted by N) is a different model
    pp = delta.prompt
    if pp.form == "kv":
        other = "after_prefix" if pp.positions == "from_zero" else "from_zero"
        wrong = dataclasses.replace(delta, prompt=PromptPart(keys=pp.keys, values=pp.values, positions=other))
        with torch.no_grad():
            off = (prompt_forward(model, wrong, spec, want["input_ids"]) - want["logits"]).abs().max().item()
        assert off > 1e-2, f"{case.name}: positions {other} also matches ({off:.2e}): the test cannot tell them apart"


def test_forms_and_position_policies():
    _, spec_l = base("llama")
    _, spec_g = base("gpt2")
    ah, od = FIXTURES / "adapterhub", FIXTURES / "opendelta"
    pre = import_delta(ah / "llama-prefix_tuning", spec_l)
    assert pre.kinds() == {"prefix"} and not pre.modules
    assert (pre.prompt.form, pre.prompt.positions, tuple(pre.prompt.keys.shape)) == ("kv", "from_zero", (2, 5, 2, 16))
    mam = import_delta(ah / "gpt2-mam", spec_g)  # prefix + parallel adapter, both in one delta
    assert mam.kinds() == {"prefix", "bottleneck"}
    par = mam.modules["transformer.h.0.mlp.c_proj"].adapter
    assert (par.source, par.scale, par.activation, par.width) == ("residual", 4.0, "relu", 8)
    assert tuple(mam.prompt.keys.shape) == (2, 5, 4, 16)  # GPT-2: 4 KV heads (no GQA)
    soft = import_delta(od / "llama-soft_prompt", spec_l)
    assert (soft.prompt.form, soft.prompt.positions, soft.num_virtual_tokens) == ("embeddings", "after_prefix", 5)
    stored = torch.load(od / "llama-soft_prompt" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(soft.prompt.embeddings, stored["soft_prompt_layer.soft_embeds"])
    odp = import_delta(od / "gpt2-prefix", spec_g)
    assert (odp.prompt.positions, tuple(odp.prompt.values.shape)) == ("from_zero", (2, 5, 4, 16))


def test_flat_prefix_layout_is_layer_major_keys_then_values():
    _, spec = base("llama")
    case = FIXTURES / "adapterhub" / "llama-prefix_tuning_flat"
    flat = torch.load(case / "pytorch_adapter.bin", weights_only=True)
    vec = next(v for k, v in flat.items() if k.startswith("model.prefix_tuning."))
    view = vec.view(5, 2 * 2, 2, 16)  # [P, 2L, n_kv, head_dim]: layer i keys at 2i, values at 2i + 1
    pp = import_delta(case, spec).prompt
    for layer in range(2):
        assert torch.equal(pp.keys[layer], view[:, 2 * layer])
        assert torch.equal(pp.values[layer], view[:, 2 * layer + 1])


def test_adapterhub_prefix_copies_must_agree(tmp_path):
    _, spec = base("llama")
    dst = shutil.copytree(FIXTURES / "adapterhub" / "llama-prefix_tuning", tmp_path / "c")
    sd = torch.load(dst / "pytorch_adapter.bin", weights_only=True)
    key = "model.layers.1.self_attn.prefix_tuning.pool.prefix_tunings.delta.self_prefix.wte.weight"
    sd[key] = sd[key] + 1.0
    torch.save(sd, dst / "pytorch_adapter.bin")
    with pytest.raises(DeltaError, match="prefix copies .* differ"):
        import_delta(dst, spec)


def test_opendelta_prefix_without_reparameterize(tmp_path):
    """``reparameterize=False`` stores each attention's ``prefix.past_key/past_value [P, hidden]``; the
    same K/V as the reparameterized fixture, laid out per layer, give the library's logits."""
    model, spec = base("gpt2")
    src = FIXTURES / "opendelta" / "gpt2-prefix"
    pp = import_delta(src, spec).prompt
    dst = tmp_path / "flat"
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["reparameterize"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = {}
    for layer in range(2):
        sd[f"transformer.h.{layer}.attn.prefix.past_key"] = pp.keys[layer].reshape(5, 64).clone()
        sd[f"transformer.h.{layer}.attn.prefix.past_value"] = pp.values[layer].reshape(5, 64).clone()
    torch.save(sd, dst / "pytorch_model.bin")
    want = load_file(str(src / "expected.safetensors"))
    with torch.no_grad():
        got = prompt_forward(model, import_delta(dst, spec), spec, want["input_ids"])
    assert_close(got, want["logits"], atol=ATOL, what="opendelta prefix, per-layer past_key/past_value")
    del sd["transformer.h.1.attn.prefix.past_value"]
    torch.save(sd, dst / "pytorch_model.bin")
    with pytest.raises(UnsupportedDelta, match="some layers only"):
        import_delta(dst, spec)


@pytest.mark.parametrize("case", UNIPELT, ids=lambda p: p.name)
def test_unipelt_refused_because_its_gates_are_not_causal(case):
    model, spec = base(_arch(case))
    with pytest.raises(UnsupportedDelta, match="UniPELT.*not causal"):
        import_delta(case, spec)
    want = load_file(str(case / "expected.safetensors"))
    # the reason, shown by the library's own numbers: the logits at position k-1 of the full 11-token pass
    # differ from those of the k-token prompt alone, so a token's output depends on the tokens after it
    gap = (want["logits"][:, :-1] - want["prefix_logits"][:, :-1]).abs().max().item()
    assert gap > 0.1
    assert_close(want["logits"][:, -1], want["prefix_logits"][:, -1], atol=ATOL, what="full prompt: same pass")
