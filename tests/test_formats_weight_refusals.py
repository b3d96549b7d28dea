"""Bad input for the weight-space kinds (DoRA, VeRA, PHM / low-rank / parallel adapters, trainable tokens), and
the PEFT methods that stay refused: each refused with its reason, at import and through ``store.put`` (nothing
stored)."""
from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from peft import LoraConfig, TrainableTokensConfig, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from delta_store import BaseSpec, DeltaStore
from delta_store.errors import DeltaError, UnsupportedDelta
from delta_store.validate import Limits
from tests.helpers import FIXTURES, assert_nothing_stored, import_delta, store_settings, tiny_llama
from tests.oracles import randomise_peft

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def spec():
    return BaseSpec.from_model(tiny_llama())


@pytest.fixture(scope="module")
def fixture_spec():
    from transformers import AutoModelForCausalLM
    return BaseSpec.from_model(AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / "llama"))


def saved(cfg, folder, **save_kw):
    pm = get_peft_model(tiny_llama(), cfg)
    randomise_peft(pm, seed=3)
    pm.save_pretrained(folder, **save_kw)
    return folder


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_kinds")
    return {
        "dora": saved(LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True), root / "dora"),
        "vera": saved(VeraConfig(r=8, target_modules=["q_proj", "down_proj"]), root / "vera"),
        "vera_no_proj": saved(VeraConfig(r=8, target_modules=["q_proj"], save_projection=False), root / "vera_np"),
        "tokens": saved(TrainableTokensConfig(token_indices=[3, 7]), root / "tokens"),
        "lora_tokens": saved(LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 7]), root / "lt"),
    }


def edited(src, dst, *, config=None, tensors=None, cfg_name="adapter_config.json", weights="adapter_model.safetensors"):
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


def _set(key, value):
    def edit(sd):
        sd[key] = value
    return edit


def _drop(*keys):
    def edit(sd):
        for k in keys:
            del sd[k]
    return edit


AH = "model.layers.0.attention_adapters.adapters.delta"
OD = "model.layers.0.self_attn.o_proj"
# name -> (source, edit kind, edit, error, reason)
BAD = {
    "dora_magnitude_wrong_length": ("dora", "tensors", _set(f"{Q}.lora_magnitude_vector", torch.ones(63)),
                                    DeltaError, r"DoRA magnitude must have one entry per output feature .*\(64,\), "
                                                r"found \(63,\)"),
    "dora_magnitude_missing": ("dora", "tensors", _drop(f"{Q}.lora_magnitude_vector"), DeltaError,
                               "use_dora=True but the file has no lora_magnitude_vector"),
    "vera_projection_missing": ("vera", "tensors", _drop("base_model.vera_A"), DeltaError,
                                "VeRA shared projection base_model.vera_A is missing"),
    "vera_projection_not_saved": ("vera_no_proj", None, None, UnsupportedDelta, "save_projection=False"),
    "vera_projection_too_small": ("vera", "tensors", _set("base_model.vera_B", torch.ones(32, 8)), DeltaError,
                                  r"vera_B \(32, 8\) is smaller than"),
    "vera_projection_rank": ("vera", "tensors", _set("base_model.vera_A", torch.ones(6, 128)), DeltaError,
                             r"expected shape \(8, max_in\) for VeRA r=8"),
    "vera_lambda_d_length": ("vera", "tensors", _set(f"{Q}.vera_lambda_d", torch.ones(5)), DeltaError,
                             r"vera_lambda_d.*expected shape \(8,\)"),
    "token_out_of_vocabulary": ("tokens", "config", lambda c: c.update(token_indices=[3, 256]), DeltaError,
                                r"token index 256 is outside the vocabulary \[0, 256\)"),
    "token_negative": ("lora_tokens", "config", lambda c: c.update(trainable_token_indices=[-1, 7]), DeltaError,
                       "token index -1 is outside the vocabulary"),
    "token_repeated": ("tokens", "config", lambda c: c.update(token_indices=[7, 7]), DeltaError, "repeats a token id"),
    "token_rows_count": ("tokens", "config", lambda c: c.update(token_indices=[3, 7, 9]), DeltaError,
                         r"3 token indices \[3, 7, 9\] but rows of shape \(2, 64\)"),
    "token_rows_missing": ("lora_tokens", "tensors",
                           _drop("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"),
                           DeltaError, "holds no trainable_tokens_delta rows"),
}
PHM_BAD = {  # fixture case -> (edit kind, edit, error, reason)
    "phm_rule_shape": ("adapterhub/llama-compacter", "tensors",
                       _set("model.shared_parameters.delta.phm_rule", torch.ones(4, 4, 3)), DeltaError,
                       r"phm_rule expected shape \(4, 4, 4\)"),
    "phm_rule_missing": ("adapterhub/llama-compacter", "tensors", _drop("model.shared_parameters.delta.phm_rule"),
                         DeltaError, "no phm_rule"),
    "phm_factor_ranks_disagree": ("adapterhub/llama-compacter", "tensors",
                                  _set(f"{AH}.adapter_down.0.W_right", torch.ones(4, 2, 2)), DeltaError,
                                  r"W_left \(4, 16, 1\) and W_right \(4, 2, 2\) are not"),
    "phm_dim_mismatch": ("adapterhub/llama-compacter", "config", lambda c: c["config"].update(phm_dim=8),
                         DeltaError, "phm_rule expected shape \\(8, 8, 8\\)"),
    "phm_rank_mismatch": ("adapterhub/llama-compacter", "config", lambda c: c["config"].update(phm_rank=2),
                          DeltaError, "rank 1, the config says phm_rank 2"),
    "opendelta_phm_factor": ("opendelta/llama-compacter", "tensors",
                             _set(f"{OD}.compactor.up_sampler.W_left", torch.ones(4, 3, 1)), DeltaError,
                             r"W_left \(4, 3, 1\) and W_right \(4, 1, 16\) are not \[4, 2, k\]"),
    "opendelta_shared_rule": ("opendelta/llama-compacter", "config", lambda c: c.update(shared_phm_rule=True),
                              UnsupportedDelta, "OpenDelta itself asserts against"),
    "low_rank_rank_2": ("opendelta/llama-low_rank_adapter", "config", lambda c: c.update(low_rank_rank=2),
                        UnsupportedDelta, "broadcasts .* only for k = 1"),
    "low_rank_factor_shape": ("opendelta/llama-low_rank_adapter", "tensors",
                              _set(f"{OD}.low_rank_adapter.down_sampler.W_right", torch.ones(1, 9)), DeltaError,
                              r"W_right \(1, 9\) are not \(64, 1\) and \(1, 8\)"),
    "parallel_pair_not_a_sub_block": ("opendelta/llama-parallel_adapter", "config",
                                      lambda c: c.update(modified_modules=["self_attn.q_proj", "self_attn.q_proj",
                                                                           "mlp.gate_proj", "mlp.down_proj"]),
                                      UnsupportedDelta, "only pairs from a sub-block's input"),
}


def _payload(name, tmp_path, peft_dirs):
    if name in BAD:
        src, how, edit, err, reason = BAD[name]
        folder = peft_dirs[src] if how is None else edited(peft_dirs[src], tmp_path / name, **{how: edit})
        return folder, err, reason
    case, how, edit, err, reason = PHM_BAD[name]
    src = FIXTURES / case
    lib = case.split("/")[0]
    kw = dict(cfg_name="adapter_config.json" if lib == "adapterhub" else "config.json",
              weights="pytorch_adapter.bin" if lib == "adapterhub" else "pytorch_model.bin")
    return edited(src, tmp_path / name, **{how: edit}, **kw), err, reason


@pytest.mark.parametrize("name", list(BAD) + list(PHM_BAD))
def test_bad_weight_kind_is_refused_with_the_reason(name, tmp_path, peft_dirs, spec, fixture_spec):
    folder, err, reason = _payload(name, tmp_path, peft_dirs)
    with pytest.raises(err, match=reason):
        import_delta(folder, fixture_spec if name in PHM_BAD else spec)


@pytest.mark.parametrize("name", ["dora_magnitude_wrong_length", "vera_projection_missing", "token_out_of_vocabulary",
                                  "phm_factor_ranks_disagree", "parallel_pair_not_a_sub_block"])
def test_store_put_refuses_and_stores_nothing(name, tmp_path, peft_dirs, spec, fixture_spec):
    folder, err, reason = _payload(name, tmp_path, peft_dirs)
    with DeltaStore.open(tmp_path / "data", fixture_spec if name in PHM_BAD else spec, Limits(),
                         store_settings()) as store:
        tenant, _ = store.tenants.create("acme")
        with pytest.raises(err, match=reason):
            store.put(tenant, "d", folder)
        assert_nothing_stored(store, tenant)


REFUSED_LIVE = {  # PEFT config class -> (extra kwargs, reason words)
    "LoHaConfig": ({}, "Hadamard product"), "LoKrConfig": ({}, "Kronecker product"),
    "OFTConfig": ({"r": 0, "oft_block_size": 4}, "block-orthogonal"),
    "BOFTConfig": ({"boft_block_size": 4}, "butterfly"), "FourierFTConfig": ({}, "inverse 2-D FFT"),
    "HRAConfig": ({}, "Householder"), "RandLoraConfig": ({}, "random bases"),
    "C3AConfig": ({"block_size": 16}, "block-circulant"), "MissConfig": ({}, "shared trainable block"),
    "WaveFTConfig": ({"n_frequency": 64}, "wavelet"), "HiraConfig": ({}, "Hadamard product with the base"),
    "VBLoRAConfig": ({"num_vectors": 32, "vector_length": 16}, "vector bank"),
    "DeloraConfig": ({}, "normalises"), "GraloraConfig": ({}, "per weight block"),
    "LNTuningConfig": ({"target_modules": ["input_layernorm"]}, "norms take only bias deltas"),
}


@pytest.mark.parametrize("cls", REFUSED_LIVE)
def test_peft_kinds_without_a_low_rank_form_are_refused(cls, tmp_path, spec):
    kw, reason = REFUSED_LIVE[cls]
    cfg = getattr(peft, cls)(**{"target_modules": ["q_proj", "v_proj"], **kw})
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedDelta, match=f"is not supported: .*{reason}"):
        import_delta(tmp_path, spec)


def _canonical_bad(spec, case):
    from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta, RowsTerm
    q = "model.layers.0.self_attn.q_proj"
    lora = LoraTerm(torch.ones(2, 64), torch.ones(64, 2), 1.0)
    rows = RowsTerm(torch.tensor([1, 2]), torch.ones(2, 64))
    mods = {
        "dora_without_lora": {q: ModuleDelta(dora_magnitude=torch.ones(64))},
        "dora_with_ia3": {q: ModuleDelta(lora=lora, dora_magnitude=torch.ones(64), out_scale=torch.ones(64))},
        "dora_with_adapter": {"model.layers.0.mlp.down_proj": ModuleDelta(
            lora=LoraTerm(torch.ones(2, 128), torch.ones(64, 2), 1.0), dora_magnitude=torch.ones(64),
            adapter=AdapterTerm(torch.ones(4, 64), torch.ones(4), torch.ones(64, 4), torch.ones(64), "relu"))},
        "rows_on_a_projection": {q: ModuleDelta(rows=rows)},
        "rows_with_bias": {"lm_head": ModuleDelta(rows=rows, bias=torch.ones(256))},
        "rows_float_index": {"model.embed_tokens": ModuleDelta(rows=RowsTerm(torch.tensor([1.0, 2.0]), rows.values))},
        "rows_wrong_width": {"model.embed_tokens": ModuleDelta(rows=RowsTerm(rows.index, torch.ones(2, 63)))},
        "normed_off_site": {q: ModuleDelta(adapter=AdapterTerm(torch.ones(4, 64), torch.ones(4), torch.ones(64, 4),
                                                               torch.ones(64), "relu", 1.0, "normed"))},
    }[case]
    return Delta(mods)


@pytest.mark.parametrize("case,reason", [
    ("dora_without_lora", "needs the module's LoRA term"), ("dora_with_ia3", "combines only with LoRA and bias"),
    ("dora_with_adapter", "combines only with LoRA and bias"), ("rows_on_a_projection", "input embedding"),
    ("rows_with_bias", "cannot be combined"), ("rows_float_index", "int64"),
    ("rows_wrong_width", r"rows.values expected shape \(2, 64\)"), ("normed_off_site", "residual-site output"),
])
def test_canonical_terms_are_validated(spec, case, reason):
    from delta_store.validate import validate
    with pytest.raises(DeltaError, match=reason):
        validate(_canonical_bad(spec, case), spec)
