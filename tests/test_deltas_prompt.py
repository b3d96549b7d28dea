"""DeltaModel and prompt parts: kept per slot on the model's device and dtype, counted in held_bytes and in the footprint the residency budget charges, dropped
on clear or replaced by the slot's next delta; a prompt-only delta's tokens take the layers' no-delta path, a
delta with module terms (MAM) keeps its slot for them."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from delta_store.delta import Delta
from delta_store.prompt import PromptPart
from server.deltas import wrap_model
from tests.helpers import FIXTURES, import_delta, tiny_llama


def test_prompt_parts_per_slot_and_the_layer_slot():
    dm = wrap_model(tiny_llama(seed=3).to(torch.float16), max_slots=4, max_rank=8, max_bottleneck=64)
    before = dm.held_bytes()
    prompt_only = Delta({}, "native", dm.spec.fingerprint, prompt=PromptPart(embeddings=torch.randn(5, 64)))
    dm.set_delta(1, prompt_only)
    part = dm.prompt_of(1)
    assert part.embeddings.dtype == torch.float16 and part.num_virtual_tokens == 5
    assert dm.held_bytes() == before + 5 * 64 * 2 == before + dm.footprint(prompt_only)
    assert dm.layer_slot(1) == -1  # no module terms: the wrapped layers see no delta for these tokens
    kv = PromptPart(keys=torch.zeros(2, 3, 2, 16), values=torch.zeros(2, 3, 2, 16), positions="from_zero")
    dm.set_delta(1, Delta({}, "native", dm.spec.fingerprint, prompt=kv))
    assert dm.prompt_of(1).form == "kv"  # the slot's next delta replaces the prompt part
    dm.clear(1)
    assert dm.prompt_of(1) is None and dm.held_bytes() == before

    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / "llama", dtype=torch.float32)
    mam = wrap_model(base, max_slots=2, max_rank=8, max_bottleneck=64)
    mam.set_delta(0, import_delta(FIXTURES / "adapterhub" / "llama-mam", mam.spec))
    assert mam.layer_slot(0) == 0 and mam.prompt_of(0).form == "kv"  # its parallel adapter needs the slot
