"""The native plan of the CPU backend (``kernels/cpu/looped.py`` over ``csrc/rows.c``, built by ``native.py``): LoRA
and bottleneck adapters against the exact reference and the strided plan over odd sizes, ranks 1-64 mixed, every
popularity pattern with base tokens mixed in, every page layout (NaN in every row no run owns), u aliasing y; the
choice (decode in fp32 takes it, the rest does not) and the build: cached per machine, refused values, no
compiler."""
from __future__ import annotations

import logging

import pytest
import torch

from kernels import DeltaKernelMeta
from kernels.cpu import choose_plan, cpu_add_bottleneck, cpu_add_lora, force_plan, looped, native
from kernels.reference import ref_add_bottleneck, ref_add_lora
from tests.helpers import assert_close
from tests.kernel_cases import (FP32_TOL, LAYOUTS, PATTERNS, adapter_pages, bottleneck_pools, lora_pages, lora_pools,
                                mixed_rank_lora_case, slot_ids, slots_tensor)

NAN = float("nan")
LORA_KEYS = ("lora_a", "lora_b", "scale", "rank")
BN_KEYS = ("down", "down_bias", "up", "up_bias", "scale", "width", "act")
BN_TOL = dict(atol=5e-5, rtol=2e-5)

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler on this machine")


def _meta(slots):
    return DeltaKernelMeta.build(slots_tensor(slots))


def _lora(slots, pages, x, y, plan):
    out = y.clone()
    with force_plan(plan):
        cpu_add_lora(out, x, pages, _meta(slots))
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_matches_reference_and_the_strided_plan(pattern, layout):
    slots, x, y, pages, expected = mixed_rank_lora_case(pattern, layout)
    out = _lora(slots, pages, x, y, "native")
    assert_close(out, expected, **FP32_TOL, what=f"native {pattern} {layout}")
    untouched = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(out[untouched], y[untouched])  # base tokens: bit for bit
    assert_close(out, _lora(slots, pages, x, y, "strided"), **FP32_TOL, what="native vs strided")


def test_lora_rank_zero_slots_and_a_row_strided_y():
    # slot 5 has no LoRA at this layer (rank 0, not in the work list), y a column slice of a wider tensor (row
    # stride 40): the columns past y's are not touched
    ranks = [1, 4, 8, 16, 64, 0, 5, 3]
    pools = lora_pools(8, 33, 23, ranks)
    slots = [6, 0, -1, 4, 3, 5, 1, 2, 7, 6, -1, 4, 0, 2]
    x = torch.randn(len(slots), 33)
    wide = torch.randn(len(slots), 40)
    y = wide[:, :23].clone()
    tail = wide[:, 23:].clone()
    expected = ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots)
    with force_plan("native"):
        cpu_add_lora(wide[:, :23], x, lora_pages(pools, layout="regions", fill=NAN), _meta(slots))
    assert_close(wide[:, :23], expected, **FP32_TOL, what="row-strided y")
    assert torch.equal(wide[:, 23:], tail)
    assert torch.equal(wide[[2, 5, 10], :23], y[[2, 5, 10]])  # slot -1 twice, and slot 5 (rank 0 here)


@pytest.mark.parametrize("pattern", ["distinct", "zipf", "skewed"])
@pytest.mark.parametrize("alias", [False, True], ids=["u", "u_is_y"])
def test_bottleneck_matches_reference(pattern, alias):
    widths = [8, 3, 0, 16, 8, 5, 16, 1, 8, 3]
    acts = [1, 3, 0, 2, 0, 3, 1, 1, 2, 0]  # every activation code
    pools = bottleneck_pools(10, 40, widths, acts, max_width=16, seed=2)
    slots = slot_ids(23, 8, pattern, pool_slots=10, seed=3, none_fraction=0.2)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(23, 40, generator=g)
    u = y if alias else torch.randn(23, 40, generator=g)
    expected = ref_add_bottleneck(y, u, *[pools[k] for k in BN_KEYS], slots)
    pages = adapter_pages(pools, layout="regions", fill=NAN)
    out = y.clone()
    with force_plan("native"):
        cpu_add_bottleneck(out, out if alias else u, pages, _meta(slots))
    assert_close(out, expected, **BN_TOL, what=f"native bottleneck {pattern} alias={alias}")
    strided = y.clone()
    with force_plan("strided"):
        cpu_add_bottleneck(strided, strided if alias else u, pages, _meta(slots))
    assert_close(out, strided, **BN_TOL, what="native vs strided")


@pytest.mark.parametrize("alias", [False, True], ids=["u", "u_is_y"])
def test_prefill_chunks_beside_decode_tokens(alias):
    # two prefill chunks (40 and 33 tokens: matmuls on their slices) beside decode tokens of other slots and of
    # the first chunk's own slot, a short run of 5 and base tokens: one call, against the reference
    assert looped.LONG_RUN <= 33
    slots = [3, 1, -1] + [0] * 40 + [4, 0, 2] + [5] * 33 + [2] * 5 + [1, -1, 6]
    ranks = [16, 4, 64, 8, 1, 32, 3]
    pools = lora_pools(7, 40, 24, ranks)
    x, y = torch.randn(len(slots), 40), torch.randn(len(slots), 24)
    meta = _meta(slots)
    assert choose_plan(meta, native_ok=True) == "native" and len(looped.split(meta).long) == 2
    out = y.clone()
    cpu_add_lora(out, x, lora_pages(pools, layout="regions", fill=NAN), meta)
    assert_close(out, ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots), **FP32_TOL, what="lora, mixed")
    widths, acts = [8, 3, 16, 5, 1, 16, 0], [1, 3, 0, 2, 0, 1, 3]
    bn = bottleneck_pools(7, 24, widths, acts, max_width=16, seed=2)
    u = y if not alias else None
    out = y.clone()
    cpu_add_bottleneck(out, out if alias else u, adapter_pages(bn, layout="regions", fill=NAN), meta)
    expected = ref_add_bottleneck(y, y if alias else u, *[bn[k] for k in BN_KEYS], slots)
    assert_close(out, expected, **BN_TOL, what=f"bottleneck, mixed, alias={alias}")


def test_segments_are_kept_per_layout():
    first = looped.split(_meta([2, 0, 1]))
    assert looped.split(_meta([2, 0, 1])) is first  # a later step, same layout: the same segments
    assert first.segs.tolist() == [[0, 0, 1], [1, 1, 1], [2, 2, 1]] and first.toks.tolist() == [1, 2, 0]
    other = looped.split(_meta([2, 0, 0, 1]))  # slot 0 has two tokens now
    assert other is not first and other.segs.tolist()[0] == [0, 0, 2] and other.most == 2


# ------------------------------------------------------------------------------------------- the choice
def test_decode_in_fp32_takes_the_native_plan():
    meta = _meta(list(range(8)) + [-1, 3])
    x = torch.randn(10, 16)
    assert choose_plan(meta, native_ok=lambda: looped.usable(x)) == "native"
    assert choose_plan(meta, native_ok=False) == "strided"
    assert choose_plan(meta, dtype=torch.float16, native_ok=True) != "native"  # half types: the torch plans
    assert choose_plan(_meta([0] * 40 + [1] * 40 + [2] * 33), native_ok=True) != "native"  # prefill: every run long
    assert choose_plan(_meta([0] * 40 + [1] * 40 + [2] * 3 + [3, 4]), native_ok=True) == "native"  # decode beside
    with force_plan("native"):
        assert choose_plan(meta, native_ok=False) == "strided"  # forced where it cannot run: the strided plan


def test_usable_only_on_plain_fp32_cpu_tensors():
    x = torch.randn(4, 8)
    assert looped.usable(x, torch.randn(3))
    assert not looped.usable(x.half())
    assert not looped.usable(torch.randn(8, 4).t())  # no unit last stride
    w = torch.randn(4, 8, requires_grad=True)
    assert not looped.usable(w)  # autograd would not see the loop's writes
    with torch.no_grad():
        assert looped.usable(w)


def test_native_gives_the_same_result_as_the_torch_plans_in_a_model_step():
    # fp16 takes the torch plans: the same call in fp32 takes the native one and matches the reference
    pools = lora_pools(6, 64, 48, [16, 4, 64, 8, 16, 4])
    slots = [5, 0, 1, 2, 3, 4, -1, 0]
    x, y = torch.randn(8, 64), torch.randn(8, 48)
    out = y.clone()
    cpu_add_lora(out, x, lora_pages(pools, layout="scattered", fill=NAN), _meta(slots))  # unforced: native
    assert_close(out, ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], slots), **FP32_TOL, what="unforced")


# ------------------------------------------------------------------------------------------- the build
@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTASERVE_NATIVE_CACHE", str(tmp_path / "cache"))
    native.reset()
    yield tmp_path / "cache"
    monkeypatch.undo()
    native.reset()


def test_the_library_is_built_once_and_reused(fresh_native):
    assert native.available()
    built = list(fresh_native.glob("rows-*.so"))
    assert len(built) == 1 and not list(fresh_native.glob(".rows-*"))  # no temp file left
    mtime = built[0].stat().st_mtime_ns
    native.reset()
    assert native.available() and built[0].stat().st_mtime_ns == mtime  # loaded, not compiled again


def test_no_compiler_falls_back_to_the_torch_plans(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="deltaserve.kernels"):
        assert native.library() is None
    assert "native_unavailable" in caplog.text
    x = torch.randn(4, 8)
    assert not looped.usable(x)
    pools = lora_pools(4, 8, 8, [4, 4, 8, 2])
    out, y = torch.randn(4, 8), None
    y = out.clone()
    with force_plan("native"):  # asked for, cannot run: the strided plan serves
        cpu_add_lora(out, x, lora_pages(pools), _meta([0, 1, 2, 3]))
    assert_close(out, ref_add_lora(y, x, *[pools[k] for k in LORA_KEYS], [0, 1, 2, 3]), **FP32_TOL, what="fallback")


def test_on_without_a_compiler_is_an_error_and_off_is_off(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("DELTASERVE_CPU_NATIVE", "on")
    with pytest.raises(native.NativeUnavailable, match="DELTASERVE_CPU_NATIVE=on"):
        native.library()
    native.reset()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("DELTASERVE_CPU_NATIVE", "off")
    assert native.library() is None and not list(fresh_native.glob("*.so"))  # nothing built


def test_a_bad_mode_is_refused_in_one_line(fresh_native, monkeypatch):
    monkeypatch.setenv("DELTASERVE_CPU_NATIVE", "sometimes")
    with pytest.raises(ValueError, match=r"^DELTASERVE_CPU_NATIVE='sometimes': expected one of auto, on, off$"):
        native.library()


# ------------------------------------------------------------------------------------------- one-row terms
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bias_and_scale_rows_match_reference(pattern):
    from kernels.cpu import cpu_add_bias, cpu_mul_rows
    from kernels.reference import ref_add_bias, ref_mul_rows
    from tests.kernel_cases import row_pages

    slots = slot_ids(33, 12, pattern, pool_slots=14, seed=7, none_fraction=0.2)
    g = torch.Generator().manual_seed(8)
    vec = 1.0 + 0.5 * torch.randn(14, 29, generator=g)
    y = torch.randn(33, 29, generator=g)
    meta = _meta(slots)
    from kernels.cpu.rows import decode_shaped

    assert decode_shaped(meta) or pattern == "identical"  # the loop (one run: a slice)
    pages = row_pages(vec, layout="scattered", seed=1, fill=NAN)
    added, scaled = y.clone(), y.clone()
    cpu_add_bias(added, pages, meta)
    cpu_mul_rows(scaled, pages, meta)
    assert torch.equal(added, ref_add_bias(y, vec, slots).float())  # one fp32 rounding: the reference, bit for bit
    assert torch.equal(scaled, ref_mul_rows(y, vec, slots).float())


def test_one_row_terms_beside_prefill_chunks():
    from kernels.cpu import cpu_add_bias, cpu_mul_rows, cpu_scale_shift_rows
    from kernels.reference import ref_add_bias, ref_mul_rows, ref_scale_shift_rows
    from tests.kernel_cases import row_pages, scale_shift_pages

    slots = [3, 1, -1] + [0] * 40 + [4, 0, 2] + [5] * 33 + [2] * 5 + [1, -1, 6]
    meta = _meta(slots)
    assert len(looped.split(meta).long) == 2
    g = torch.Generator().manual_seed(11)
    vec = 1.0 + 0.5 * torch.randn(8, 19, generator=g)
    y = torch.randn(len(slots), 19, generator=g)
    pages = row_pages(vec, layout="scattered", seed=3, fill=NAN)
    added, scaled = y.clone(), y.clone()
    cpu_add_bias(added, pages, meta)
    cpu_mul_rows(scaled, pages, meta)
    assert torch.equal(added, ref_add_bias(y, vec, slots).float())
    assert torch.equal(scaled, ref_mul_rows(y, vec, slots).float())
    flag = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.int32)
    shift = 0.01 * torch.randn(8, 19, generator=g)
    out = y.clone()
    cpu_scale_shift_rows(out, scale_shift_pages(vec, shift, flag, layout="regions", seed=2), meta)
    assert_close(out, ref_scale_shift_rows(y, vec, shift, flag, slots), atol=1e-6, rtol=1e-6, what="mixed")


def test_a_row_outside_the_pages_is_refused():
    from kernels import RowPages

    meta = _meta(list(range(10)))
    rows = torch.randn(10, 8)
    pages = RowPages(rows, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], dtype=torch.int32))
    y = torch.randn(10, 8)
    before = y.clone()
    with pytest.raises(ValueError, match="slot 9: row outside the 10 rows"):
        looped.native_rows(y, pages, meta, 0)
    assert torch.equal(y, before)  # checked before anything is written


def test_a_run_or_code_outside_the_pages_is_refused_before_any_write():
    from kernels import AdapterPages, LoraPages

    meta = _meta([0, 1, 2, 1])
    rows = torch.randn(20, 8)
    rank = torch.tensor([4, 4, 4], dtype=torch.int32)
    scale = torch.ones(3)
    y, x = torch.randn(4, 8), torch.randn(4, 8)
    before = y.clone()
    bad = LoraPages(rows, rows, torch.tensor([0, 4, 17], dtype=torch.int32), rank, scale, 4)
    with pytest.raises(ValueError, match="add_lora: slot 2: rank 4 from row 17 outside the 20 rows"):
        looped.native_lora(y, x, bad, meta)
    assert torch.equal(y, before)
    start = torch.tensor([0, 4, 8], dtype=torch.int32)
    ub_row = torch.zeros(3, dtype=torch.int32)
    for act in ([0, 9, 1], [0, 1, -1]):
        pages = AdapterPages(rows, rows, rows[:, 0], rows[:1], start, ub_row, rank, scale,
                             torch.tensor(act, dtype=torch.int32), 4)
        with pytest.raises(ValueError, match=r"add_bottleneck: slot [12]: act\[[12]\] = (9|-1) is not an activation"):
            looped.native_bottleneck(y, y, pages, meta)
        assert torch.equal(y, before)


def test_tokens_on_the_neutral_row_are_left_as_they_are():
    from kernels import RowPages, add_bias, mul_rows, skips_neutral

    meta = _meta([0, 1, -1, 2, 1, 0])
    rows = torch.randn(4, 5)
    rows[3] = 0.0  # the neutral row of a bias
    pages = RowPages(rows, torch.tensor([3, 1, 0], dtype=torch.int32), neutral=3)
    y = torch.randn(6, 5)
    y[0] = -0.0  # -0.0 + 0.0 would be +0.0: a skipped token keeps its bits
    assert skips_neutral(y, meta)
    out = y.clone()
    add_bias(out, pages, meta)
    assert torch.equal(out[[0, 5, 2]], y[[0, 5, 2]]) and str(out[0, 0].item()) == "-0.0"
    assert torch.equal(out[[1, 4]], y[[1, 4]] + rows[1]) and torch.equal(out[3], y[3] + rows[0])
    ones = torch.ones(4, 5)
    ones[0] = 2.0
    scaled = y.clone()
    mul_rows(scaled, RowPages(ones, torch.tensor([1, 0, 1], dtype=torch.int32), neutral=1), meta)
    assert torch.equal(scaled[[0, 2, 3, 5]], y[[0, 2, 3, 5]]) and torch.equal(scaled[[1, 4]], 2 * y[[1, 4]])
    with pytest.raises(ValueError, match="pages.neutral must be -1 or a row of pages.rows"):
        add_bias(y.clone(), RowPages(rows, torch.tensor([3, 1, 0], dtype=torch.int32), neutral=4), meta)


@pytest.mark.parametrize("pattern", ["distinct", "uniform", "zipf"])
def test_column_scale_matches_reference_and_leaves_unflagged_tokens(pattern):
    from kernels.cpu import cpu_scale_shift_rows
    from kernels.reference import ref_scale_shift_rows
    from tests.kernel_cases import scale_shift_pages

    slots = slot_ids(30, 12, pattern, pool_slots=14, seed=9, none_fraction=0.2)
    g = torch.Generator().manual_seed(10)
    scale, shift = 1 + 0.1 * torch.randn(14, 27, generator=g), 0.01 * torch.randn(14, 27, generator=g)
    flag = torch.tensor([s % 3 != 0 for s in range(14)], dtype=torch.int32)
    y = torch.randn(30, 27, generator=g)
    out = y.clone()
    cpu_scale_shift_rows(out, scale_shift_pages(scale, shift, flag, layout="regions", seed=2), _meta(slots))
    assert_close(out, ref_scale_shift_rows(y, scale, shift, flag, slots), atol=1e-6, rtol=1e-6, what=pattern)
    keep = [i for i, s in enumerate(slots) if s < 0 or not flag[s]]
    assert torch.equal(out[keep], y[keep])  # base and unflagged tokens: never touched


def test_serve_builds_the_loops_at_start_and_refuses_on_without_a_compiler(fresh_native, monkeypatch):
    from server.app import native_loops
    from server.config import ConfigError

    cpu = torch.device("cpu")
    assert native_loops(cpu) == "on"
    native.reset()
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("DELTASERVE_CPU_NATIVE", "on")
    with pytest.raises(ConfigError, match="^DELTASERVE_CPU_NATIVE=on: "):
        native_loops(cpu)
    native.reset()
    monkeypatch.setenv("DELTASERVE_CPU_NATIVE", "off")
    assert native_loops(cpu) == "off"
