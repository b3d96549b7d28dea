"""DoRA, VeRA and trainable tokens from live PEFT 0.21.2 -> canonical Delta, with the library's numbers.

Each adapter is made by PEFT in the test (random non-zero values), saved, imported and applied to a fresh
copy of the base through the hook oracle (tests/oracles.py); the logits must equal PEFT's own forward
within 1e-5 (fp32). The DoRA column norm from the low-rank factors (delta_store/dora.py) is checked
against the dense norm, and the native format round-trips the new terms bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TrainableTokensConfig, VeraConfig, get_peft_model

from delta_store import BaseSpec
from delta_store.delta import Delta, LoraTerm, ModuleDelta, RowsTerm
from delta_store.dora import base_row_sq, column_norm, dora_scale
from delta_store.errors import DeltaError
from delta_store.formats import detect_format
from delta_store.native import dump_native, load_native
from tests.helpers import import_delta, tiny_gpt2, tiny_llama
from tests.oracles import apply_delta, randomise_peft

IDS = torch.tensor([[3, 5, 7, 9, 3, 200, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8]])  # ids 3 and 7 are trained tokens
MODELS = {"llama": lambda: tiny_llama(seed=1), "qwen2": lambda: tiny_llama(seed=2, model_type="qwen2"),
          "mistral": lambda: tiny_llama(seed=3, model_type="mistral"), "gpt2": lambda: tiny_gpt2(seed=4)}


def peft_parity(arch: str, cfg, folder, *, std: float = 0.1, atol: float = 1e-5):
    """Make the adapter with PEFT, import it, and compare the hooked fresh base with PEFT's forward."""
    pm = get_peft_model(MODELS[arch](), cfg)
    randomise_peft(pm, seed=11, std=std)
    pm.eval().save_pretrained(folder)
    fresh = MODELS[arch]()
    spec = BaseSpec.from_model(fresh)
    assert detect_format(folder) == "peft"
    delta = import_delta(folder, spec)
    with torch.no_grad():
        theirs, base = pm(IDS).logits, fresh(IDS).logits
        with apply_delta(fresh, delta, spec):
            ours = fresh(IDS).logits
    assert (theirs - base).abs().max() > 1e-2, "the adapter is a no-op; the test would prove nothing"
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    return delta, spec, pm


DORA_CASES = {
    "llama-mixed-ranks": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 16})),
    "qwen2-qkv-biases": ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "qwen2-bias-lora_only": ("qwen2", dict(r=2, target_modules=["q_proj", "v_proj"], bias="lora_only")),
    "mistral-rslora": ("mistral", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "mlp.c_proj"], rank_pattern={"c_attn": 2})),
    "gpt2-conv1d-bias-all": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], bias="all")),
}


@pytest.mark.parametrize("case", DORA_CASES, ids=list(DORA_CASES))
def test_dora_matches_peft(tmp_path, case):
    arch, kw = DORA_CASES[case]
    delta, spec, pm = peft_parity(arch, LoraConfig(use_dora=True, **kw), tmp_path)
    from peft.tuners.lora import LoraLayer
    layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(delta.modules) >= set(layers)
    for path, layer in layers.items():
        md = delta.modules[path]
        assert md.kinds() >= {"lora", "dora"}
        torch.testing.assert_close(md.dora_magnitude, layer.lora_magnitude_vector["default"].weight.detach())
    if kw.get("bias") in ("all", "lora_only"):  # trained absolute biases -> unscaled additive deltas
        assert "bitfit" in delta.kinds()


def test_dora_column_norm_from_factors_equals_the_dense_norm():
    g = torch.Generator().manual_seed(0)
    for out, fin, r, dtype in ((64, 128, 4, torch.float32), (192, 64, 16, torch.float32), (33, 17, 1, torch.float64),
                               (96, 80, 8, torch.bfloat16)):
        w = torch.randn(out, fin, generator=g).to(dtype)
        lora = LoraTerm(0.3 * torch.randn(r, fin, generator=g), 0.3 * torch.randn(out, r, generator=g), 1.7)
        dense = torch.linalg.norm(w.double() + lora.scale * (lora.b.double() @ lora.a.double()), dim=1)
        got = column_norm(w, lora)
        assert got.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(got.double(), dense, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
        torch.testing.assert_close(column_norm(w, lora, base_sq=base_row_sq(w)), got)
    mag = torch.ones(out)
    with pytest.raises(DeltaError, match="row norm of W \\+ s\\*B\\*A is 0 at output 3"):
        w = torch.randn(out, fin, generator=g)
        w[3] = 0.0
        dora_scale(w, LoraTerm(torch.zeros(r, fin), torch.zeros(out, r), 1.0), mag)


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "down_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_vera_expands_into_lora(tmp_path, arch, targets):
    delta, spec, pm = peft_parity(arch, VeraConfig(r=8, target_modules=targets), tmp_path, std=1.0)
    assert delta.kinds() == {"lora"}
    for path, md in delta.modules.items():
        info = spec.modules[path]
        assert md.lora.rank == 8 and md.lora.scale == 1.0
        assert md.lora.a.shape == (8, info.in_features) and md.lora.b.shape == (info.out_features, 8)
        layer = pm.get_submodule("base_model.model." + path)  # A' B' is PEFT's own merged delta weight
        want = layer.get_delta_weight("default")
        want = want.T if info.kind == "conv1d" else want
        torch.testing.assert_close(md.lora.b @ md.lora.a, want.detach())


@pytest.mark.parametrize("case", ["gpt2-tt", "llama-tt", "gpt2-lora-list", "gpt2-lora-dict-untied-ids",
                                  "llama-lora-dict-head"])
def test_trainable_tokens_replace_rows(tmp_path, case):
    arch = case.split("-")[0]
    cfg = {"gpt2-tt": TrainableTokensConfig(token_indices=[3, 7]),
           "llama-tt": TrainableTokensConfig(token_indices=[3, 7, 250]),
           "gpt2-lora-list": LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[3, 7]),
           "gpt2-lora-dict-untied-ids": LoraConfig(r=2, target_modules=["c_attn"],
                                                   trainable_token_indices={"wte": [3, 7], "lm_head": [7, 9]}),
           "llama-lora-dict-head": LoraConfig(r=2, target_modules=["q_proj"],
                                              trainable_token_indices={"embed_tokens": [3, 7], "lm_head": [7, 9]}),
           }[case]
    delta, spec, _ = peft_parity(arch, cfg, tmp_path)
    emb, head = delta.modules[spec.input_embedding].rows, delta.modules.get(spec.output_head)
    assert emb.index.tolist() == (cfg.token_indices if case.endswith("-tt") else [3, 7])
    if case == "llama-tt":  # untied: the head keeps its weights
        assert head is None
    elif case in ("gpt2-tt", "gpt2-lora-list"):  # tied: the head follows the embedding's rows
        assert head.rows.index.tolist() == emb.index.tolist() and torch.equal(head.rows.values, emb.values)
    else:  # a dict naming the head gives it its own rows
        assert head.rows.index.tolist() == [7, 9]


def test_native_round_trip_of_dora_and_rows():
    spec = BaseSpec.from_model(tiny_gpt2())
    g = torch.Generator().manual_seed(5)
    p = "transformer.h.0.attn.c_attn"
    info = spec.modules[p]
    delta = Delta({
        p: ModuleDelta(lora=LoraTerm(torch.randn(3, info.in_features, generator=g),
                                     torch.randn(info.out_features, 3, generator=g), 0.5),
                       dora_magnitude=torch.rand(info.out_features, generator=g), bias=torch.randn(192, generator=g)),
        "transformer.wte": ModuleDelta(rows=RowsTerm(torch.tensor([4, 0, 255]), torch.randn(3, 64, generator=g))),
    }, "peft", spec.fingerprint)
    data = dump_native(delta)
    back = load_native(data)
    assert dump_native(back) == data
    assert back.kinds() == {"lora", "dora", "bitfit", "tokens"}
    assert back.modules["transformer.wte"].rows.index.dtype == torch.int64
    torch.testing.assert_close(back.modules[p].dora_magnitude, delta.modules[p].dora_magnitude, rtol=0, atol=0)
    half = back.to(torch.float16)
    assert half.modules["transformer.wte"].rows.index.dtype == torch.int64
    assert half.modules[p].dora_magnitude.dtype == torch.float16
