"""AdapterHub rules beyond the fixtures: GPT-2 fused-qkv LoRA/(IA)3, learned/channel scaling, presets,
per-layer reduction factors, leave_out, the pre-1.1.0 LoRA scale and the pre-version activation rename.

Reference numbers come from re-implementing the library's forward pass (adapters 1.3.0,
``methods/lora.py: LoRAMergedLinear.forward`` and ``methods/modeling.py: Adapter``) in torch here."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from delta_store import BaseSpec, DeltaError
from tests.helpers import FIXTURES, import_delta, tiny_gpt2
from tests.oracles import apply_delta


def write(folder, config, tensors, version="adapters.1.3.0", name="t"):
    folder.mkdir(parents=True)
    meta = {"config": config, "hidden_size": 64, "model_class": "GPT2LMHeadModel", "name": name}
    if version is not None:
        meta["version"] = version
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    torch.save(tensors, folder / "pytorch_adapter.bin")
    return folder


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_gpt2_fused_c_attn_matches_the_library_forward(tmp_path, mode):
    model = tiny_gpt2(3)
    spec = BaseSpec.from_model(model)
    g = torch.Generator().manual_seed(1)
    r, alpha, d = (2, 6, 64) if mode == "add" else (1, 2, 64)
    cfg = {"architecture": "lora", "r": r, "alpha": alpha, "attn_matrices": ["q", "v"], "composition_mode": mode,
           "selfattn_lora": True, "intermediate_lora": False, "output_lora": False}
    tensors = {}
    for i in range(2):
        p = f"transformer.h.{i}.attn.c_attn.loras.t"
        if mode == "add":
            tensors[f"{p}.lora_A"] = 0.2 * torch.randn(2 * r, 64, generator=g)  # [r * n_heads, in]
        tensors[f"{p}.lora_B"] = (0.2 * torch.randn(2 * d, r, generator=g) + (1.0 if mode == "scale" else 0.0))
    delta = import_delta(write(tmp_path / mode, cfg, tensors), spec)

    def library(mod, args, out):  # LoRAMergedLinear.forward, one adapter, no gating
        x, i = args[0], int(names[mod].split(".")[2])
        p = f"transformer.h.{i}.attn.c_attn.loras.t"
        b = tensors[f"{p}.lora_B"]
        if mode == "scale":
            delta_w = b.view(1, 1, -1)
        else:
            after_a = F.linear(x, tensors[f"{p}.lora_A"])
            delta_w = F.conv1d(after_a.transpose(-2, -1), b.unsqueeze(-1), groups=2).transpose(-2, -1)
        fill = 0.0 if mode == "add" else 1.0
        padded = delta_w.new_full((*delta_w.shape[:-1], 3 * d), fill)
        padded[..., :d], padded[..., 2 * d:] = delta_w[..., :d], delta_w[..., d:]
        return out + padded * (alpha / r) if mode == "add" else out * (padded * alpha)

    names = {m: n for n, m in model.named_modules()}
    ids = torch.randint(0, 256, (2, 6), generator=g)
    with torch.no_grad():
        hs = [model.transformer.h[i].attn.c_attn.register_forward_hook(library) for i in range(2)]
        want = model(ids).logits
        for h in hs:
            h.remove()
        with apply_delta(model, delta, spec):
            got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if mode == "add":
        assert delta.modules["transformer.h.0.attn.c_attn"].lora.rank == 4  # two groups of r=2


def _copy_case(tmp_path, case, edit_cfg=None, edit_meta=None, edit_tensors=None):
    dst = tmp_path / case
    shutil.copytree(FIXTURES / "adapterhub" / case, dst)
    meta = json.loads((dst / "adapter_config.json").read_text())
    if edit_cfg:
        edit_cfg(meta["config"])
    if edit_meta:
        edit_meta(meta)
    (dst / "adapter_config.json").write_text(json.dumps(meta))
    if edit_tensors:
        sd = torch.load(dst / "pytorch_adapter.bin", weights_only=True)
        edit_tensors(sd)
        torch.save(sd, dst / "pytorch_adapter.bin")
    return dst


def test_learned_and_channel_scaling(tmp_path):
    spec = BaseSpec.from_model(tiny_gpt2())
    sites = ("transformer.h.0.output_adapters.adapters.delta", "transformer.h.1.output_adapters.adapters.delta")
    ref = import_delta(FIXTURES / "adapterhub" / "gpt2-seq_bn", spec)
    learned = import_delta(_copy_case(tmp_path / "l", "gpt2-seq_bn", lambda c: c.update(scaling="learned"),
                                    edit_tensors=lambda sd: [sd.__setitem__(f"{s}.scaling", torch.tensor([0.5]))
                                                             for s in sites]), spec)
    assert learned.modules["transformer.h.0.mlp.c_proj"].adapter.scale == 0.5
    ch = torch.linspace(0.5, 1.5, 64)
    channel = import_delta(_copy_case(tmp_path / "c", "gpt2-seq_bn", lambda c: c.update(scaling="channel"),
                                    edit_tensors=lambda sd: [sd.__setitem__(f"{s}.scaling", ch) for s in sites]), spec)
    a, b = channel.modules["transformer.h.1.mlp.c_proj"].adapter, ref.modules["transformer.h.1.mlp.c_proj"].adapter
    z = torch.randn(5, 4)
    torch.testing.assert_close(z @ a.up.T + a.up_bias, (z @ b.up.T + b.up_bias) * ch)  # folded exactly


def test_preset_string_and_unversioned_activation_rename(tmp_path):
    spec = BaseSpec.from_model(tiny_gpt2())
    d = import_delta(_copy_case(tmp_path, "gpt2-double_seq_bn", edit_meta=lambda m: m.update(config="houlsby")), spec)
    ad = d.modules["transformer.h.0.attn.c_proj"].adapter
    assert (ad.source, ad.activation) == ("output", "silu")

    def old(m):  # adapter-transformers v1: no "version", and "gelu" meant the tanh approximation
        m.pop("version")
        m["config"]["non_linearity"] = "gelu"
    d = import_delta(_copy_case(tmp_path / "old", "gpt2-seq_bn", edit_meta=old), spec)
    assert d.modules["transformer.h.0.mlp.c_proj"].adapter.activation == "gelu_new"


def test_reduction_factor_dict_and_leave_out(tmp_path):
    spec = BaseSpec.from_model(tiny_gpt2())
    import_delta(_copy_case(tmp_path / "a", "gpt2-seq_bn", lambda c: c.update(reduction_factor={"1": 16, "default": 16})),
               spec)
    with pytest.raises(DeltaError, match="reduction_factor 4 on hidden 64 gives width 16, the tensor has 4"):
        import_delta(_copy_case(tmp_path / "b", "gpt2-seq_bn", lambda c: c.update(reduction_factor={"0": 4,
                                                                                                 "default": 16})), spec)
    with pytest.raises(DeltaError, match="leave_out"):
        import_delta(_copy_case(tmp_path / "c", "gpt2-seq_bn", lambda c: c.update(leave_out=[1])), spec)


def test_lora_scale_rule_before_1_1_0(tmp_path):
    from transformers import AutoModelForCausalLM
    spec = BaseSpec.from_model(AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / "llama"))
    p = "model.layers.0.self_attn.q_proj"
    assert import_delta(FIXTURES / "adapterhub" / "llama-lora", spec).modules[p].lora.scale == 2.0
    old = _copy_case(tmp_path / "old", "llama-lora", edit_meta=lambda m: m.update(version="adapters.1.0.1"))
    assert import_delta(old, spec).modules[p].lora.scale == 1.0  # faulty scaling kept, as the library does
    legacy = _copy_case(tmp_path / "at", "llama-lora", edit_meta=lambda m: m.update(version="3.2.1"))
    assert import_delta(legacy, spec).modules[p].lora.scale == 2.0  # adapter-transformers: not "adapters." versions
