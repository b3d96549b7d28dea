"""A small pure-torch application of a canonical Delta to an HF model, and its checks.

The layers engineer owns serving parity (tests/test_model_*.py); this functional version exists so
that conversions can be checked numerically here: every importer's Delta, applied with forward hooks
exactly as ``delta_store/delta.py`` defines the semantics, must reproduce the producing library.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from delta_store import BaseSpec
from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from tests.helpers import tiny_gpt2, tiny_llama

_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def _bottleneck(ad: AdapterTerm, src: torch.Tensor) -> torch.Tensor:
    hidden = _ACT[ad.activation](src @ ad.down.T.to(src.dtype) + ad.down_bias.to(src.dtype))
    return ad.scale * (hidden @ ad.up.T.to(src.dtype) + ad.up_bias.to(src.dtype))


@contextlib.contextmanager
def apply_delta(model: torch.nn.Module, delta: Delta, spec: BaseSpec):
    """Within the block, ``model`` computes with ``delta`` active (forward hooks; weights untouched)."""
    modules = dict(model.named_modules())
    handles, residual = [], {}

    def capture(norm_path):
        def pre(_mod, args):
            residual[norm_path] = args[0]
        return pre

    def make_hook(path: str, md: ModuleDelta, norm_path: str | None):
        def hook(mod, args, out):
            x = args[0]
            y = type(mod).forward(mod, x * md.in_scale.to(x.dtype)) if md.in_scale is not None else out
            if md.out_scale is not None:
                y = y * md.out_scale.to(y.dtype)
            if md.lora is not None:
                y = y + md.lora.scale * ((x @ md.lora.a.T.to(x.dtype)) @ md.lora.b.T.to(x.dtype))
            if md.bias is not None:
                y = y + md.bias.to(y.dtype)
            if md.adapter is not None:
                ad = md.adapter
                h = residual.get(norm_path) if norm_path else None
                src = {"output": y, "output+residual": None if h is None else y + h, "residual": h}[ad.source]
                y = y + _bottleneck(ad, src)
            return y
        return hook

    for path, md in delta.modules.items():
        norm_path = None
        info = spec.modules[path]
        if md.adapter is not None and md.adapter.source != "output":
            for norm_leaf, out_leaf in spec.sites().values():
                site = spec.find(info.layer, out_leaf)
                if site is not None and site.path == path:
                    norm_path = spec.find(info.layer, norm_leaf).path
                    handles.append(modules[norm_path].register_forward_pre_hook(capture(norm_path)))
        handles.append(modules[path].register_forward_hook(make_hook(path, md, norm_path)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


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
