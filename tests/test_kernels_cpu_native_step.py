"""The ops of a decode step bound to its meta (``kernels.step_ops``, ``kernels/cpu/native_step.py``): equal to the
public ops for every kind over popularity patterns and page layouts; a module's terms in one call (``apply_terms``)
equal to them one by one; None wherever the native plan would not serve the whole step; activations that do not fit
and bad pages go through the public op's checks (same message); and a wrapped model's logits with every kind of term
are the same with and without them, and with and without the one-call terms."""
from __future__ import annotations

import copy

import pytest
import torch

import kernels
from delta_store.base_spec import BaseSpec
from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from kernels import DeltaKernelMeta, ModuleTerms, RowPages, step_ops
from kernels.cpu import force_plan, native
from kernels.cpu.native_step import NativeStep
from kernels.reference import ref_add_bias, ref_add_bottleneck, ref_add_lora, ref_mul_rows, ref_scale_shift_rows
from server.deltas import wrap_model
from server.deltas.linear import DeltaLinear
from tests.helpers import assert_close, tiny_llama
from tests.kernel_cases import (FP32_TOL, LAYOUTS, PATTERNS, adapter_pages, bottleneck_pools, lora_pages, lora_pools,
                                mixed_rank_lora_case, on, row_pages, scale_shift_pages, slot_ids, slots_tensor)

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler on this machine")
NAN = float("nan")
BN_KEYS = ("down", "down_bias", "up", "up_bias", "scale", "width", "act")


def _meta(slots):
    return DeltaKernelMeta.build(slots_tensor(slots))


def _bound(meta, t):
    """The step's bound ops: None exactly for a step of prefill runs alone (every run 8 tokens or more)."""
    ops = step_ops(meta, t)
    assert (ops is None) == all(b - a >= 8 for a, b, _ in meta.runs_host)
    return ops


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bound_lora_equals_the_public_op(pattern, layout):
    slots, x, y, pages, expected = mixed_rank_lora_case(pattern, layout)
    meta = _meta(slots)
    with torch.no_grad():
        ops = _bound(meta, x)
        if ops is None:  # a hot delta's tokens side by side only: a prefill
            return
        out = y.clone()
        ops.add_lora(out, x, pages)  # any run of 8 tokens or more: its matmuls, as the public op's native plan
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
        ops = _bound(meta, y)
        if ops is None:
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


def _terms_case(pattern: str, layout: str, seed: int = 0):
    """(slots, x, y, terms, expected): 40 resident slots of ranks 0-63 (in 37, out 23), an (IA)3 output scale, LoRA,
    DoRA's column scale on a third of the slots and a bias, each on its own pages laid out by ``layout``; expected
    the exact reference of the four in turn."""
    ranks = [(11 * s + seed) % 64 for s in range(40)]
    pools = lora_pools(40, 37, 23, ranks, seed=3 + seed)
    slots = slot_ids(29, 14, pattern, pool_slots=40, seed=4 + seed, none_fraction=0.25)
    g = torch.Generator().manual_seed(5 + seed)
    x, y = torch.randn(29, 37, generator=g), torch.randn(29, 23, generator=g)
    scale, bias = 1.0 + 0.3 * torch.randn(40, 23, generator=g), 0.1 * torch.randn(40, 23, generator=g)
    g_rows, shift = 1.0 + 0.1 * torch.randn(40, 23, generator=g), 0.01 * torch.randn(40, 23, generator=g)
    flag = torch.tensor([s % 3 == 0 for s in range(40)], dtype=torch.int32)
    terms = ModuleTerms((("mul_rows", row_pages(scale, layout=layout, seed=1, fill=NAN)),
                         ("add_lora", lora_pages(pools, layout=layout, seed=6, fill=NAN)),
                         ("scale_shift_rows", scale_shift_pages(g_rows, shift, flag, layout=layout, seed=2)),
                         ("add_bias", row_pages(bias, layout=layout, seed=7, fill=NAN))))
    want = ref_mul_rows(y, scale, slots)
    want = ref_add_lora(want, x, *[pools[k] for k in ("lora_a", "lora_b", "scale", "rank")], slots)
    want = ref_add_bias(ref_scale_shift_rows(want, g_rows, shift, flag, slots), bias, slots)
    return slots, x, y, terms, want


def _one_by_one(ops, y, x, terms):
    for op, pages in terms.ops:
        if op == "add_lora":
            ops.add_lora(y, x, pages)
        else:
            getattr(ops, op)(y, pages)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_modules_terms_in_one_call_equal_the_bound_ops_one_by_one(pattern, layout):
    slots, x, y, terms, expected = _terms_case(pattern, layout)
    meta = _meta(slots)
    with torch.no_grad():
        ops = _bound(meta, x)
        if ops is None:
            return
        fused, each = y.clone(), y.clone()
        ops.apply_terms(fused, x, terms)
        assert isinstance(terms.memo["native_step"], tuple)  # packed: the one native call served it
        _one_by_one(ops, each, x, terms)
        again = y.clone()
        ops.apply_terms(again, x, terms)  # the packed records again
    assert torch.equal(fused, each) and torch.equal(again, fused)
    assert_close(fused, expected, **FP32_TOL, what=f"{pattern} {layout}")


def test_module_terms_hold_only_known_ops_on_their_pages():
    rows = RowPages(torch.randn(4, 8), torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="ModuleTerms: expected \\(op, pages\\) pairs"):
        ModuleTerms((("add_lora", rows),))
    with pytest.raises(ValueError, match="ModuleTerms: expected"):
        ModuleTerms((("replace_rows", rows),))
    assert ModuleTerms((("add_bias", rows), ("mul_rows", rows))).ops[1][0] == "mul_rows"


def test_one_call_terms_refused_by_the_loop_write_nothing_and_name_the_slot():
    slots, x, y, terms, _ = _terms_case("distinct", "scattered")
    meta = _meta(slots)
    bad_rows = RowPages(torch.randn(41, 23), torch.arange(40, dtype=torch.int32))
    bad = ModuleTerms((("add_bias", bad_rows),) + terms.ops)
    with torch.no_grad():
        ops = step_ops(meta, x)
        out = y.clone()
        ops.apply_terms(out, x, bad)  # checked and packed while every row is in range
        active = next(s for s in slots if s >= 0)
        bad_rows.row[active] = 41  # now past the rows: the loop refuses the whole call, then the op names it
        before = y.clone()
        with pytest.raises(ValueError, match=f"add_bias: slot {active}: row outside the 41 rows"):
            ops.apply_terms(before, x, bad)
    assert torch.equal(before, y)


def test_one_call_terms_with_activations_that_do_not_fit_get_the_public_checks():
    slots, x, y, terms, expected = _terms_case("uniform", "regions")
    meta = _meta(slots)
    with torch.no_grad():
        ops = step_ops(meta, x)
        half = r"mul_rows: pages.rows .* has dtype torch.float32, expected torch.float16"
        with pytest.raises(ValueError, match=half):
            ops.apply_terms(y.half(), x, terms)
        assert "native_step" not in terms.memo  # a misfit is this call's, not kept
        with pytest.raises(ValueError, match=r"add_lora: x has shape \[29, 36\], expected \[29, 37\]"):
            ops.apply_terms(y.clone(), x[:, :36], terms)
        wide = torch.randn(len(slots), 30)
        out = wide[:, 2:25]  # a row-strided y: the loops take it
        out.copy_(y)
        ops.apply_terms(out, x, terms)
    assert_close(out, expected, **FP32_TOL, what="row-strided y")


def test_no_bound_ops_where_the_native_plan_would_not_serve_the_whole_step():
    decode = _meta([3, 0, -1, 2, 1])
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert step_ops(decode, x) is not None
        assert step_ops(decode, x) is step_ops(decode, x)  # one per step
        assert step_ops(decode, x.half()) is None  # fp32 only
        assert step_ops(_meta([0] * 9 + [1] * 8), torch.randn(17, 8)) is None  # prefill runs of 9 and 8 tokens
        assert step_ops(_meta([0] * 9 + [1]), torch.randn(10, 8)) is not None  # a chunk beside a decode token
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


@pytest.mark.parametrize("mixed", [False, True], ids=["decode", "chunks_beside_decode"])
def test_a_wrapped_model_serves_the_same_logits_with_and_without_bound_ops(monkeypatch, mixed):
    base = tiny_llama(seed=3, heads=4, kv_heads=2)
    spec = BaseSpec.from_model(base)
    dm = wrap_model(copy.deepcopy(base), max_slots=8, max_rank=16)
    for slot, kind in enumerate(("lora", "ia3", "dora", "adapter", "lora")):
        dm.set_delta(slot, _every_kind(spec, 10 + slot, kind))
    slots = [-1, 4, 0, -1, 2, 1, 3, 0, 2, 1]  # runs of one token (decode-shaped), base rows among them
    if mixed:  # prefill chunks of 9 and 8 tokens beside them
        slots = [2] * 9 + slots + [3] * 8
    ids = torch.randint(0, 200, (1, len(slots)), generator=torch.Generator().manual_seed(1))

    def logits():
        dm.batch.prepare(slots)
        with torch.no_grad(), on("cpu"):
            return dm.model(input_ids=ids).logits[0]

    calls, fused = [], []
    real, real_apply = kernels.step_ops, NativeStep.apply_terms
    monkeypatch.setattr(kernels, "step_ops", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(NativeStep, "apply_terms", lambda self, *a: fused.append(a[2]) or real_apply(self, *a))
    bound = logits()
    assert calls and all(c is not None for c in calls)  # the bound ops served every wrapped module
    assert fused and all("native_step" in t.memo and t.memo["native_step"] for t in fused)  # in one call each
    monkeypatch.setattr(DeltaLinear, "step_terms", lambda self, plan: None)  # the bound ops one by one
    assert torch.equal(bound, logits())
    monkeypatch.setattr(kernels, "step_ops", lambda *a: None)  # the public ops
    public = logits()
    if mixed:  # the public ops' siblings share one shrink matmul over their stacked A on the chunks: fp32 rounding
        assert_close(bound, public, atol=1e-5, rtol=1e-5, what="chunks beside decode tokens")
    else:
        assert torch.equal(bound, public)
    with torch.no_grad():
        bare = base(input_ids=ids).logits[0]
    if slots[0] == -1:
        assert torch.equal(bound[0], bare[0])  # the base token before any delta's: bit for bit


def test_one_call_terms_follow_installs_and_clears_between_steps(monkeypatch):
    base = tiny_llama(seed=4, heads=4, kv_heads=2)
    spec = BaseSpec.from_model(base)
    dm = wrap_model(copy.deepcopy(base), max_slots=8, max_rank=16)
    dm.ensure_slots(3)
    dm.set_delta(0, _every_kind(spec, 20, "lora"))
    ids = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(2))
    slots = [0, -1, 1, 2, 0, 1]

    def logits(bound: bool):
        if not bound:
            monkeypatch.setattr(kernels, "step_ops", lambda *a: None)
        dm.batch.prepare(slots)
        with torch.no_grad(), on("cpu"):
            out = dm.model(input_ids=ids).logits[0]
        monkeypatch.undo()
        return out

    # the only delta cleared and another installed (its neutral rows freed and taken again), swaps, then clears
    steps = [(None, 0), ("lora", 2), ("ia3", 1), ("dora", 2), ("lora", 1), (None, 2), ("lora", 0), (None, 1)]
    for kind, slot in steps:
        assert torch.equal(logits(True), logits(False)), (kind, slot)
        if kind is None:
            dm.clear(slot)
        else:
            dm.set_delta(slot, _every_kind(spec, 30 + slot, kind))
    assert dm.compact() >= 0  # cells moved: the kept terms' storage key changes
    assert torch.equal(logits(True), logits(False))


def test_a_step_with_prefill_chunks_beside_decode_tokens_is_bound_and_equal_to_the_public_ops():
    # two chunks (12 and 9 tokens) among single tokens and base rows: the chunks take matmuls, the rest the loop
    slots = [3] * 12 + [0, -1, 5, 1] + [7] * 9 + [2, 0, -1]
    meta = _meta(slots)
    T = len(slots)
    g = torch.Generator().manual_seed(9)
    ranks = [(5 * s) % 17 for s in range(8)]
    pools = lora_pools(8, 21, 19, ranks, seed=8)
    lp = lora_pages(pools, layout="scattered", seed=1, fill=NAN)
    x, y = torch.randn(T, 21, generator=g), torch.randn(T, 19, generator=g)
    vec, bias = 1.0 + 0.3 * torch.randn(8, 19, generator=g), 0.1 * torch.randn(8, 19, generator=g)
    flag = torch.tensor([s % 2 for s in range(8)], dtype=torch.int32)
    shift = 0.01 * torch.randn(8, 19, generator=g)
    bn = bottleneck_pools(8, 19, [(3 * s) % 7 for s in range(8)], [s % 4 for s in range(8)], max_width=8, seed=4)
    terms = ModuleTerms((("mul_rows", row_pages(vec, layout="regions", seed=2, fill=NAN)), ("add_lora", lp),
                         ("scale_shift_rows", scale_shift_pages(vec, shift, flag, layout="regions", seed=3)),
                         ("add_bias", row_pages(bias, layout="scattered", seed=5, fill=NAN))))
    ap = adapter_pages(bn, layout="regions", fill=NAN)
    with torch.no_grad():
        ops = step_ops(meta, x)
        assert ops is not None and ops.long
        fused, each, public = y.clone(), y.clone(), y.clone()
        ops.apply_terms(fused, x, terms)
        assert terms.memo["native_step"]  # one native call for the loop's tokens
        _one_by_one(ops, each, x, terms)
        ops.add_bottleneck(fused, fused, ap)
        ops.add_bottleneck(each, each, ap)
        with on("cpu"):
            for op, pages in terms.ops:
                if op == "add_lora":
                    kernels.add_lora(public, x, pages, meta)
                else:
                    getattr(kernels, op)(public, pages, meta)
            kernels.add_bottleneck(public, public, ap, meta)
    assert torch.equal(fused, each) and torch.equal(fused, public)
    want = ref_mul_rows(y, vec, slots)
    want = ref_add_lora(want, x, *[pools[k] for k in ("lora_a", "lora_b", "scale", "rank")], slots)
    want = ref_add_bias(ref_scale_shift_rows(want, vec, shift, flag, slots), bias, slots)
    want = ref_add_bottleneck(want, want, *[bn[k] for k in BN_KEYS], slots)
    assert_close(fused, want, atol=5e-5, rtol=2e-5, what="mixed step")
