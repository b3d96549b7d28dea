"""Checks of the hook oracle itself (tests/oracles.py: apply_delta): it must equal an explicit merge and
really read the adapter input it is asked for, since every importer's parity test trusts it."""
from __future__ import annotations

import pytest
import torch

from delta_store import BaseSpec
from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from tests.helpers import tiny_gpt2, tiny_llama
from tests.oracles import apply_delta

def test_apply_delta_matches_an_explicit_merge_on_linear_and_conv1d():
    """LoRA + bias + (IA)3 out-scale via hooks == the same delta merged into the weights."""
    for model in (tiny_llama(1), tiny_gpt2(1)):
        spec = BaseSpec.from_model(model)
        path = next(p for p, i in spec.modules.items() if i.kind in ("linear", "conv1d") and i.layer == 1)
        info = spec.modules[path]
        g = torch.Generator().manual_seed(3)
        a, b = torch.randn(3, info.in_features, generator=g), torch.randn(info.out_features, 3, generator=g)
        bias, vec = torch.randn(info.out_features, generator=g), 1 + 0.1 * torch.randn(info.out_features, generator=g)
        delta = Delta({path: ModuleDelta(lora=LoraTerm(a * 0.1, b * 0.1, 1.5), bias=bias, out_scale=vec)})
        ids = torch.randint(0, 256, (2, 7), generator=g)
        with torch.no_grad(), apply_delta(model, delta, spec):
            hooked = model(ids).logits
        mod = dict(model.named_modules())[path]
        with torch.no_grad():
            dw = 1.5 * (b * 0.1) @ (a * 0.1)  # [out, in]
            if info.kind == "conv1d":  # weight [in, out]
                mod.weight.mul_(vec[None, :]).add_(dw.T)
            else:
                mod.weight.mul_(vec[:, None]).add_(dw)
            if mod.bias is not None:
                mod.bias.mul_(vec).add_(bias)
            else:
                mod.bias = torch.nn.Parameter(bias.clone())
            merged = model(ids).logits
        torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["output", "output+residual", "residual"])
def test_apply_delta_adapter_sources_differ(source):
    """The three adapter inputs give three different outputs (the hook really reads h where asked)."""
    model = tiny_llama(2)
    spec = BaseSpec.from_model(model)
    path = "model.layers.0.mlp.down_proj"
    g = torch.Generator().manual_seed(4)
    ad = AdapterTerm(torch.randn(4, 64, generator=g) * 0.3, torch.zeros(4), torch.randn(64, 4, generator=g) * 0.3,
                     torch.zeros(64), "relu", 1.0, source)
    ids = torch.randint(0, 256, (1, 5), generator=g)
    outs = {}
    with torch.no_grad():
        base = model(ids).logits
        for src in ("output", "output+residual", "residual"):
            ad.source = src
            with apply_delta(model, Delta({path: ModuleDelta(adapter=ad)}), spec):
                outs[src] = model(ids).logits
    assert not torch.allclose(outs[source], base, atol=1e-4)
    others = [s for s in outs if s != source]
    assert all(not torch.allclose(outs[source], outs[o], atol=1e-4) for o in others)
