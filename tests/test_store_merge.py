"""delta_store/merge.py: rank-concatenated LoRA merges equal PEFT's add_weighted_adapter(cat), live."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from delta_store import BaseSpec
from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from delta_store.errors import DeltaError, InvalidArgument
from delta_store.merge import merge_lora
from delta_store.merge_rules import merge_digest
from tests.helpers import import_delta, tiny_gpt2, tiny_llama
from tests.oracles import apply_delta, randomise_peft

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))


def two_adapters(base, cfg_a, cfg_b, tmp_path):
    pm = get_peft_model(copy.deepcopy(base), cfg_a, adapter_name="a")
    pm.add_adapter("b", cfg_b)
    randomise_peft(pm, seed=5)
    pm.eval()
    for name in ("a", "b"):
        pm.set_adapter(name)
        pm.save_pretrained(tmp_path / name, selected_adapters=[name])
    return pm


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_peft_cat(arch, tmp_path):
    base = tiny_llama(seed=6) if arch == "llama" else tiny_gpt2(seed=6)
    if arch == "llama":
        cfg_a = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        cfg_b = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "down_proj"])
    else:
        cfg_a = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
        cfg_b = LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "mlp.c_proj"])
    pm = two_adapters(base, cfg_a, cfg_b, tmp_path)
    pm.add_weighted_adapter(["a", "b"], [0.7, 0.3], "m", combination_type="cat")
    pm.set_adapter("m")
    spec = BaseSpec.from_model(base)
    # PEFT writes a non-default adapter into a subfolder named after it
    da, db = import_delta(tmp_path / "a" / "a", spec), import_delta(tmp_path / "b" / "b", spec)
    merged = merge_lora([(da, 0.7), (db, 0.3)], names=["a", "b"])
    assert merged.kinds() == {"lora"} and merged.source_format == "merge"
    q = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    assert merged.modules[q].lora.rank == 6 and merged.modules[q].lora.scale == 1.0
    with torch.no_grad():
        theirs = pm(IDS).logits
        fresh = copy.deepcopy(base)
        with apply_delta(fresh, merged, spec):
            ours = fresh(IDS).logits
        alone = fresh(IDS).logits
    assert (theirs - alone).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_merge_refusals_and_digest():
    q = "model.layers.0.self_attn.q_proj"
    lora = Delta({q: ModuleDelta(lora=LoraTerm(torch.ones(2, 64), torch.ones(64, 2), 1.0))})
    dora = Delta({q: ModuleDelta(lora=LoraTerm(torch.ones(2, 64), torch.ones(64, 2), 1.0),
                                 dora_magnitude=torch.ones(64))})
    adapter = Delta({"model.layers.0.mlp.down_proj": ModuleDelta(adapter=AdapterTerm(
        torch.ones(4, 64), torch.ones(4), torch.ones(64, 4), torch.ones(64), "relu"))})
    with pytest.raises(DeltaError, match="b cannot be merged exactly: it holds dora: DoRA divides by the norm"):
        merge_lora([(lora, 1.0), (dora, 1.0)], names=["a", "b"])
    with pytest.raises(DeltaError, match="holds bottleneck: a bottleneck adapter passes through a nonlinearity"):
        merge_lora([(adapter, 1.0)])
    with pytest.raises(InvalidArgument, match="not a finite number"):
        merge_lora([(lora, float("nan"))])
    with pytest.raises(DeltaError, match=f"{q} would have rank 4 .* above the server's max_rank 3"):
        merge_lora([(lora, 0.5), (lora, 0.5)], max_rank=3)
    assert merge_digest([("x", 0.7), ("y", 0.3)]) == merge_digest([("x", 0.7), ("y", 0.3)])
    assert merge_digest([("x", 0.7), ("y", 0.3)]) != merge_digest([("y", 0.3), ("x", 0.7)])
    assert merge_digest([("x", 0.7), ("y", 0.3)]) != merge_digest([("x", 0.7), ("y", 0.30000001)])
