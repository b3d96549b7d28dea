"""The ops of a decode step bound to its meta (``kernels.step_ops``, ``kernels/cpu/native_step.py``): equal to the
public ops for every kind over popularity patterns and page layouts; None wherever the native plan would not serve the
whole step; activations that do not fit and bad pages go through the public op's checks (same message); and a wrapped
model's logits with every kind of term are the same with and without them."""
from __future__ import annotations

import copy

import pytest
import torch

import kernels
from delta_store.base_spec import BaseSpec
from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from kernels import DeltaKernelMeta, RowPages, step_ops
from kernels.cpu import force_plan, native
from kernels.reference import ref_add_bias, ref_add_bottleneck, ref_mul_rows, ref_scale_shift_rows
from server.deltas import wrap_model
from tests.helpers import assert_close, tiny_llama
from tests.kernel_cases import (FP32_TOL, LAYOUTS, PATTERNS, adapter_pages, bottleneck_pools, mixed_rank_lora_case,
                                on, row_pages, scale_shift_pages, slot_ids, slots_tensor)

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler on this machine")
NAN = float("nan")
BN_KEYS = ("down", "down_bias", "up", "up_bias", "scale", "width", "act")


def _meta(slots):
    return DeltaKernelMeta.build(slots_tensor(slots))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bound_lora_equals_the_public_op(pattern, layout):
    slots, x, y, pages, expected = mixed_rank_lora_case(pattern, layout)
    meta = _meta(slots)
    with torch.no_grad():
        ops = step_ops(meta, x)
        if any(b - a >= 8 for a, b, _ in meta.runs_host):  # a hot delta's tokens side by side: not a decode step
            assert ops is None
            return
        out = y.clone()
        ops.add_lora(out, x, pages)
        public = y.clone()
        with on("cpu"):
            kernels.add_lora(public, x, pages, meta)
    assert torch.equal(out, public)  # the same loop
    assert_close(out, expected, **FP32_TOL, what=f"{pattern} {layout}")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bound_rows_adapters_and_column_scale_equal_the_reference(pattern):
    slots = slot_ids(23, 9, pattern, pool_slots=12, seed=5, none_fraction=0.2)
    meta = _meta(slots)
    g = torch.Generator().manual_seed(6)
    y = torch.randn(len(slots), 19, generator=g)
    vec = 1.0 + 0.5 * torch.randn(12, 19, generator=g)
    widths, acts = [(3 * s) % 11 for s in range(12)], [s % 4 for s in range(12)]
    bn = bottleneck_pools(12, 19, widths, acts, max_width=16, seed=7)
    flag = torch.tensor([s % 3 != 1 for s in range(12)], dtype=torch.int32)
    shift = 0.01 * torch.randn(12, 19, generator=g)
    with torch.no_grad():
        ops = step_ops(meta, y)
        if ops is None:
            assert any(b - a >= 8 for a, b, _ in meta.runs_host)
            return
        added, scaled, adapted, affine = y.clone(), y.clone(), y.clone(), y.clone()
        ops.add_bias(added, row_pages(vec, layout="scattered", seed=3, fill=NAN))
        ops.mul_rows(scaled, row_pages(vec, layout="regions", seed=4, fill=NAN))
        ops.add_bottleneck(adapted, adapted, adapter_pages(bn, layout="regions", fill=NAN))
        ops.scale_shift_rows(affine, scale_shift_pages(vec, shift, flag, layout="regions", seed=2))
    assert torch.equal(added, ref_add_bias(y, vec, slots).float())
    assert torch.equal(scaled, ref_mul_rows(y, vec, slots).float())
    assert_close(adapted, ref_add_bottleneck(y, y, *[bn[k] for k in BN_KEYS], slots), atol=5e-5, rtol=2e-5,
                 what=f"bottleneck {pattern}")
    assert_close(affine, ref_scale_shift_rows(y, vec, shift, flag, slots), atol=1e-6, rtol=1e-6, what=pattern)


def test_no_bound_ops_where_the_native_plan_would_not_serve_the_whole_step():
    decode = _meta([3, 0, -1, 2, 1])
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert step_ops(decode, x) is not None
        assert step_ops(decode, x) is step_ops(decode, x)  # one per step
        assert step_ops(decode, x.half()) is None  # fp32 only
        assert step_ops(_meta([0] * 9 + [1]), torch.randn(10, 8)) is None  # a prefill run of 9 tokens
        assert step_ops(_meta([-1, -1]), torch.randn(2, 8)) is None  # nothing but base tokens
        with force_plan("strided"):  # a forced plan is honoured: the public ops decide
            assert step_ops(decode, x) is None
    assert step_ops(decode, x) is None  # autograd on: the loops write behind its back


def test_activations_that_do_not_fit_get_the_public_checks_and_message():
    slots, x, y, pages, expected = mixed_rank_lora_case("distinct", "scattered")
    meta = _meta(slots)
    with torch.no_grad():
        ops = step_ops(meta, x)
        with pytest.raises(ValueError, match=r"add_lora: x has shape \[29, 36\], expected \[29, 37\]"):
            ops.add_lora(y.clone(), x[:, :36], pages)
        with pytest.raises(ValueError, match="add_lora: .* has dtype torch.float32, expected torch.float16"):
            ops.add_lora(y.half(), x, pages)
        wide = torch.randn(len(slots), 40)
        out = wide[:, 3:26]  # a row-strided y: fits (unit last stride), the loop takes it
        before = wide.clone()
        ops.add_lora(out, x, pages)
        assert_close(out, expected - y + before[:, 3:26], **FP32_TOL, what="row-strided y")
        assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 26:], before[:, 26:])


def test_bad_pages_are_refused_by_the_public_checks_before_any_write():
    meta = _meta([0, 1, 2])
    y = torch.randn(3, 8)
    before = y.clone()
    with torch.no_grad():
        ops = step_ops(meta, y)
        with pytest.raises(ValueError, match="pages.neutral must be -1 or a row"):
            ops.add_bias(y, RowPages(torch.randn(4, 8), torch.tensor([0, 1, 2], dtype=torch.int32), neutral=7))
        with pytest.raises(ValueError, match="slot 2: row outside the 4 rows"):
            ops.add_bias(y, RowPages(torch.randn(4, 8), torch.tensor([0, 1, 4], dtype=torch.int32)))
    assert torch.equal(y, before)


def _every_kind(spec, seed: int, kind: str) -> Delta:
    """A delta of one ``kind`` on every wrapped linear of the tiny model (LoRA with a bias and DoRA magnitudes for
    "dora"), seeded."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for path, info in sorted(spec.modules.items()):
        if info.kind != "linear" or info.layer is None:
            continue
        n_in, n_out = info.in_features, info.out_features
        if kind == "lora":
            r = 1 + seed % 5
            lora = LoraTerm(0.2 * torch.randn(r, n_in, generator=g), 0.2 * torch.randn(n_out, r, generator=g), 0.7)
            mods[path] = ModuleDelta(lora=lora, bias=0.1 * torch.randn(n_out, generator=g))
        elif kind == "ia3":
            if path.endswith("down_proj"):  # PEFT's feed-forward modules scale their input
                mods[path] = ModuleDelta(in_scale=1 + 0.2 * torch.randn(n_in, generator=g))
            else:
                mods[path] = ModuleDelta(out_scale=1 + 0.2 * torch.randn(n_out, generator=g))
        elif kind == "dora":
            lora = LoraTerm(0.2 * torch.randn(2, n_in, generator=g), 0.2 * torch.randn(n_out, 2, generator=g), 1.0)
            mods[path] = ModuleDelta(lora=lora, dora_magnitude=1 + 0.1 * torch.rand(n_out, generator=g))
        else:  # a bottleneck adapter on the module's output
            m = 3
            mods[path] = ModuleDelta(adapter=AdapterTerm(0.3 * torch.randn(m, n_out, generator=g),
                                                         0.1 * torch.randn(m, generator=g),
                                                         0.3 * torch.randn(n_out, m, generator=g),
                                                         0.1 * torch.randn(n_out, generator=g), "gelu"))
    return Delta(mods, "native", spec.fingerprint)


def test_a_wrapped_model_serves_the_same_logits_with_and_without_bound_ops(monkeypatch):
    base = tiny_llama(seed=3, heads=4, kv_heads=2)
    spec = BaseSpec.from_model(base)
    dm = wrap_model(copy.deepcopy(base), max_slots=8, max_rank=16)
    for slot, kind in enumerate(("lora", "ia3", "dora", "adapter", "lora")):
        dm.set_delta(slot, _every_kind(spec, 10 + slot, kind))
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    slots = [-1, 4, 0, -1, 2, 1, 3, 0, 2, 1]  # runs of one token (decode-shaped), base rows among them

    def logits():
        dm.batch.prepare(slots)
        with torch.no_grad(), on("cpu"):
            return dm.model(input_ids=ids).logits[0]

    calls = []
    real = kernels.step_ops
    monkeypatch.setattr(kernels, "step_ops", lambda *a: calls.append(real(*a)) or calls[-1])
    bound = logits()
    assert calls and all(c is not None for c in calls)  # the bound ops served every wrapped module
    monkeypatch.setattr(kernels, "step_ops", lambda *a: None)
    assert torch.equal(bound, logits())
    with torch.no_grad():
        bare = base(input_ids=ids).logits[0]
    assert torch.equal(bound[0], bare[0])  # the base token before any delta's: bit for bit
