"""A DeltaLinear's per-step decisions: its step plan follows terms placed or cleared between steps with the same
active slots, and the pages it hands the kernels carry live host mirrors equal to the device slot tables."""
from __future__ import annotations

import torch

from delta_store.delta import LoraTerm, ModuleDelta
from server.deltas import DeltaBatch, DeltaLinear
from tests.helpers import assert_close


def test_step_plan_follows_terms_changed_between_steps_with_the_same_active_slots():
    """A layer keeps its step plan while the active slots repeat (decode), but a term placed or cleared between two
    such steps is served at once: the plan is keyed on the layer's terms too."""
    base = torch.nn.Linear(24, 40)
    batch = DeltaBatch(4)
    layer = DeltaLinear(base, batch, path="p", max_rank=8, max_bottleneck=8)
    batch.slot_capacity = 4
    g = torch.Generator().manual_seed(0)
    lora = LoraTerm(torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g), 0.5)
    bias = torch.randn(40, generator=g)
    x = torch.randn(3, 24, generator=g)

    def place(slot, md):
        staged = layer.stage(md)
        with torch.inference_mode():
            layer.rows.grow(layer.rows.demand({t: r.shape[0] for t, r in staged.rows.items()}), 1 << 30)
            layer.place(slot, staged, capacity=4)

    def step():
        batch.prepare([1, 1, -1])
        with torch.no_grad():
            return layer(x)

    with torch.no_grad():
        bare = base(x)
    assert torch.equal(step(), bare)  # slot 1 has nothing here: the bare layer
    assert layer.step_plan(batch.meta) is None
    place(1, ModuleDelta(lora=lora))
    want = bare.clone()
    want[:2] += 0.5 * (x[:2] @ lora.a.T) @ lora.b.T
    assert_close(step(), want, atol=2e-5, rtol=2e-5, what="LoRA placed between steps")
    place(1, ModuleDelta(lora=lora, bias=bias))  # replaced in place: same slot, same active set, one more term
    want[:2] += bias
    assert_close(step(), want, atol=2e-5, rtol=2e-5, what="bias added between steps")
    with torch.inference_mode():
        layer.clear(1)
    assert torch.equal(step(), bare)


def test_pages_host_mirrors_hold_the_device_tables():
    """The pages hand the CPU backend live host mirrors of the slot tables: equal to the device values after every
    place / clear, fp32 fields rounded as the device holds them (kernels.pages.HOST_MIRRORS)."""
    base = torch.nn.Linear(24, 40)
    batch = DeltaBatch(4)
    layer = DeltaLinear(base, batch, path="p", max_rank=8, max_bottleneck=8)
    g = torch.Generator().manual_seed(1)
    for slot, (r, scale) in enumerate([(3, 0.1), (5, 1 / 3), (2, 2.0 ** 0.5)]):
        staged = layer.stage(ModuleDelta(lora=LoraTerm(torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g),
                                                       scale), bias=torch.randn(40, generator=g)))
        with torch.inference_mode():
            layer.rows.grow(layer.rows.demand({t: v.shape[0] for t, v in staged.rows.items()}), 1 << 30)
            layer.place(slot, staged, capacity=4)
    with torch.inference_mode():
        layer.clear(1)
    lp, bp = layer.lora_pages(), layer.row_pages("bias")
    for name in ("start", "rank", "scale"):
        assert lp.host[name] == getattr(lp, name).tolist(), name
    assert bp.host["row"] == bp.row.tolist()
    assert lp.host["scale"][0] != 0.1 and lp.host["scale"][0] == torch.tensor(0.1).item()  # fp32-rounded
