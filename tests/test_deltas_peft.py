"""PEFT parity, live: one packed forward mixing LoRA (mixed ranks, rsLoRA, patterns, biases), (IA)3, BEFT,
a bottleneck adapter and base-only rows equals, row by row, PEFT's own forward with that adapter active.

Each adapter is created with PEFT on a copy of the base, given random weights (PEFT zero-initialises
``lora_B`` and sets (IA)3 to ones, which would make it a no-op), saved with ``save_pretrained`` and
imported with ``tests.helpers.import_delta`` (the store's ``Importer``): the path a tenant's upload takes.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import BeftConfig, IA3Config, LoraConfig, get_peft_model

import kernels
from delta_store.base_spec import BaseSpec
from delta_store.delta import Delta
from server.deltas import wrap_model
from tests.helpers import TOLERANCES, assert_close, import_delta, tiny_gpt2, tiny_llama
from tests.oracles import apply_delta, randomise_peft, site_adapters

ATOL = TOLERANCES[torch.float32]["atol"]
SEQ = 7

CASES = {
    "llama": {
        "lora_qv_r2": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        "lora_all_rslora_patterns": lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
            rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6}, alpha_pattern={"up_proj": 3.0}),
        "lora_r16_lora_bias": lambda: LoraConfig(r=16, lora_alpha=16, lora_bias=True,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
        "ia3": lambda: IA3Config(),  # k/v scale outputs, down_proj (feed-forward) scales its input
        "beft": lambda: BeftConfig(target_modules=["v_proj", "down_proj"]),
    },
    "gpt2": {
        "lora_c_attn_r2": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]),
        "lora_all_rslora_patterns": lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True,
            rank_pattern={"mlp.c_proj": 6, "transformer.h.1.attn.c_attn": 2}, alpha_pattern={"c_fc": 2.0}),
        "lora_r16_lora_only": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "mlp.c_fc"],
                                                 bias="lora_only", lora_bias=True),
        "ia3": lambda: IA3Config(),  # c_attn output (bias scaled too), mlp.c_proj input
        # BEFT only targets nn.Linear (PEFT refuses GPT-2's Conv1D); GPT-2 BitFit is covered by
        # bias="lora_only" above and by the OpenDelta gpt2-bitfit fixture.
    },
    "mistral": {
        "lora_all_rslora_patterns": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                                       rank_pattern={"o_proj": 2}),
        "ia3": lambda: IA3Config(),
    },
    "qwen2": {
        "lora_qkv_lora_only": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                 bias="lora_only"),
        "ia3": lambda: IA3Config(),
    },
}
BASES = {"llama": lambda: tiny_llama(seed=5), "gpt2": lambda: tiny_gpt2(seed=6),
         "mistral": lambda: tiny_llama(seed=8, model_type="mistral"),
         "qwen2": lambda: tiny_llama(seed=7, model_type="qwen2")}


def _peft_delta(base, cfg, seed: int, folder, spec: BaseSpec):
    """(Delta imported from PEFT's saved folder, the live PeftModel with that adapter active)."""
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomise_peft(pm, seed)
    pm.eval()
    pm.save_pretrained(folder)
    return import_delta(folder, spec), pm


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def _pfeiffer_and_parallel(spec: BaseSpec, seed: int) -> Delta:
    """A hand-made bottleneck delta: Pfeiffer (h + y) after the FFN, parallel (h, scale 4) after attention."""
    return site_adapters(spec, seed, {"ffn": ("output+residual", "relu", 1.0, 4), "attn": ("residual", "gelu", 4.0, 8)})


def _adapter_reference(base, delta: Delta, spec: BaseSpec, ids: torch.Tensor) -> torch.Tensor:
    """The same adapters applied with forward hooks on an unwrapped copy: out = h + y + BN(src)."""
    with torch.no_grad(), apply_delta(copy.deepcopy(base), delta, spec) as model:
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("arch", sorted(CASES))
def test_packed_mixed_deltas_equal_peft_per_row(arch, tmp_path):
    base = BASES[arch]()
    spec = BaseSpec.from_model(base)
    names = list(CASES[arch])
    rows = ["none", *names, "none", names[0]]  # base rows and a delta used by two rows (identical slot)
    if arch in ("llama", "gpt2"):
        rows.insert(2, "adapters")
    ids = torch.randint(0, 256, (len(rows), SEQ), generator=torch.Generator().manual_seed(11))
    deltas, refs, expected = {}, {}, {}
    for i, name in enumerate(rows):
        row = ids[i:i + 1]
        if name == "none":
            expected[i] = _logits(base, row)
        elif name == "adapters":
            deltas[name] = _pfeiffer_and_parallel(spec, seed=3)
            expected[i] = _adapter_reference(base, deltas[name], spec, row)
        else:
            if name not in deltas:
                deltas[name], refs[name] = _peft_delta(base, CASES[arch][name](), 100 + i, tmp_path / name, spec)
            expected[i] = _logits(refs[name], row)

    with torch.no_grad():
        base_rows = base(input_ids=ids).logits
    dm = wrap_model(base, max_slots=8, max_rank=16, max_bottleneck=16)
    slot_of = {}
    for slot, (name, delta) in enumerate(reversed(list(deltas.items()))):  # slot order != row order
        dm.set_delta(slot, delta)
        slot_of[name] = slot
    dm.batch.prepare_sequences([slot_of.get(name, -1) for name in rows], [SEQ] * len(rows))
    assert len(dm.batch.meta.active_slots_host) == len(deltas)
    with torch.no_grad():
        got = dm.model(input_ids=ids).logits
    for i, name in enumerate(rows):
        assert_close(got[i], expected[i], atol=ATOL, what=f"{arch} row {i} ({name})")
        if name != "none":  # the delta really changes this row, so equality is not the base twice
            assert (expected[i] - base_rows[i]).abs().max() > 1e-3, f"{arch} {name} is a no-op"


def test_triton_backend_end_to_end_matches_peft(tmp_path):
    """The same packed forward through the Triton ops (interpreter on CPU): one tiny case per kind."""
    base = tiny_llama(seed=5, layers=1)
    spec = BaseSpec.from_model(base)
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(2))
    lora, pm = _peft_delta(base, CASES["llama"]["lora_r16_lora_bias"](), 1, tmp_path / "l", spec)
    lora_ref = _logits(pm, ids[0:1])
    ia3, pm = _peft_delta(base, IA3Config(), 2, tmp_path / "i", spec)
    ia3_ref = _logits(pm, ids[1:2])
    adapters = _pfeiffer_and_parallel(spec, seed=4)
    ad_ref = _adapter_reference(base, adapters, spec, ids[2:3])
    dm = wrap_model(base, max_slots=3, max_rank=16, max_bottleneck=16)
    for slot, d in enumerate((lora, ia3, adapters)):
        dm.set_delta(slot, d)
    dm.batch.prepare_sequences([0, 1, 2], [5, 5, 5])
    with kernels.backend("triton"), torch.no_grad():
        got = dm.model(input_ids=ids).logits
    for i, ref in enumerate((lora_ref, ia3_ref, ad_ref)):
        assert_close(got[i], ref, atol=ATOL, what=f"triton row {i}")
