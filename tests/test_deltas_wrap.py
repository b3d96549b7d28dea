"""wrap_model structure, the DeltaBatch, exact no-delta equality, the load-path refusals, and where a layer keeps
its terms (paged rows: nothing before the first delta, each term its bucketed rows)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from delta_store.errors import DeltaError, DeltaServeError, InvalidArgument
from kernels.cpu import grouped
from server.deltas import DeltaBatch, DeltaEmbedding, DeltaHead, DeltaLinear, DeltaNorm, wrap_model
from server.deltas.pages import bucket_rows
from tests.helpers import assert_close, tiny_gpt2, tiny_llama


def _bias_of(layer, slot: int) -> torch.Tensor:
    """The bias row ``slot`` reads at ``layer`` (its own, or the neutral zero row)."""
    pages = layer.row_pages("bias") if isinstance(layer, DeltaLinear) else layer.bias_pages()
    return pages.rows[pages.row[slot]]

ARCHS = {
    "llama": lambda: tiny_llama(),
    "mistral": lambda: tiny_llama(model_type="mistral"),
    "qwen2": lambda: tiny_llama(model_type="qwen2"),
    "gpt2": lambda: tiny_gpt2(),
}


def _ids(batch: int = 3, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_no_delta_logits_equal_bare_model_exactly(arch):
    bare = ARCHS[arch]()
    dm = wrap_model(copy.deepcopy(bare), max_slots=4, max_rank=8, max_bottleneck=8)
    ids = _ids()
    with torch.no_grad():
        expected = bare(input_ids=ids).logits
        got_unprepared = dm.model(input_ids=ids).logits  # never prepared: the bare base
        dm.batch.prepare_sequences([-1, -1, -1], [6, 6, 6])
        got_prepared = dm.model(input_ids=ids).logits
    assert torch.equal(got_unprepared, expected)
    assert torch.equal(got_prepared, expected)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_base_rows_stay_exact_next_to_delta_rows(arch):
    """Neutral pool rows (rank 0, bias 0, scale 1) leave the base-only sequence bit-identical."""
    bare = ARCHS[arch]()
    dm = wrap_model(copy.deepcopy(bare), max_slots=4, max_rank=8, max_bottleneck=8)
    g = torch.Generator().manual_seed(3)
    md = {}
    for path, layer in dm.layers.items():
        if isinstance(layer, DeltaLinear):
            fin, fout = layer.in_features, layer.out_features
            md[path] = ModuleDelta(lora=LoraTerm(torch.randn(4, fin, generator=g), torch.randn(fout, 4, generator=g), 0.5),
                                   bias=torch.randn(fout, generator=g) * 0.1,
                                   out_scale=1 + 0.1 * torch.randn(fout, generator=g))
    dm.set_delta(2, Delta(md))
    ids = _ids(2)
    with torch.no_grad():
        expected = bare(input_ids=ids).logits
        dm.batch.prepare_sequences([2, -1], [6, 6])
        got = dm.model(input_ids=ids).logits
    assert torch.equal(got[1], expected[1])
    assert (got[0] - expected[0]).abs().max() > 1e-2  # the delta row really changed


def test_wrapped_modules_llama_and_gpt2():
    dm = wrap_model(tiny_llama(), targets=("q_proj", "v_proj"), max_slots=2, max_rank=4, max_bottleneck=4)
    leaves = {p.split("layers.")[1].split(".", 1)[1] for p in dm.layers if "layers." in p}
    # q/v from the targets, o_proj/down_proj and their pre-norms for adapter sites
    assert leaves == {"self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj",
                      "input_layernorm", "post_attention_layernorm"}
    # outside the layers: the input embedding and the output head (trainable tokens), nothing else
    assert {p for p in dm.layers if "layers." not in p} == {"model.embed_tokens", "lm_head"}
    assert isinstance(dm.model.model.embed_tokens, DeltaEmbedding) and isinstance(dm.model.lm_head, DeltaHead)
    assert dm.model.model.embed_tokens.nbytes() == 0  # row pools only on the first trainable-token delta
    assert isinstance(dm.model.model.layers[0].self_attn.q_proj, DeltaLinear)
    assert not isinstance(dm.model.model.layers[0].self_attn.k_proj, DeltaLinear)
    assert not isinstance(dm.model.lm_head, DeltaLinear)
    assert dm.layers["model.layers.0.self_attn.o_proj"].tap is dm.layers["model.layers.0.input_layernorm"].tap

    dm = wrap_model(tiny_gpt2(), max_slots=2, max_rank=4, max_bottleneck=4)
    assert isinstance(dm.model.transformer.ln_f, DeltaNorm) and dm.model.transformer.ln_f.has_bias_pool
    assert dm.model.lm_head.weight is dm.model.transformer.wte.weight  # tie survives wrapping
    assert isinstance(dm.model.lm_head, DeltaHead) and isinstance(dm.model.transformer.wte, DeltaEmbedding)
    assert not isinstance(dm.model.transformer.wpe, DeltaEmbedding)  # positions: not the input embedding
    c_attn = dm.model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, DeltaLinear) and (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert c_attn.nf == 192  # attribute misses reach the wrapped Conv1D
    assert "transformer.h.0.attn.c_attn.base.weight" in dm.model.state_dict()
    assert not any("lora_a" in k for k in dm.model.state_dict())  # pools are not checkpoint state
    with pytest.raises(InvalidArgument, match="already wrapped"):
        wrap_model(dm.model)


def test_no_delta_memory_until_a_delta_arrives_then_each_term_its_bucketed_rows():
    dm = wrap_model(tiny_llama(), targets=("q_proj",), max_slots=4, max_rank=256, max_bottleneck=4)
    assert dm.capacity_bytes() == 0 and dm.held_bytes() == 0  # max_rank=256 reserved nothing
    q = dm.layers["model.layers.0.self_attn.q_proj"]
    o = dm.layers["model.layers.0.self_attn.o_proj"]
    fin, fout = q.in_features, q.out_features
    delta = Delta({q.path: _lora(fin, fout, r=5), o.path: ModuleDelta(adapter=AdapterTerm(
        torch.randn(3, 64), torch.randn(3), torch.randn(64, 3), torch.randn(64), "relu"))})
    dm.set_delta(1, delta)
    width = q.w_in + q.w_out  # one LoRA row: A row | B column, 16-byte aligned halves
    assert q.rows.arenas["lora"].held_bytes == bucket_rows(5) * width * 4 == 6 * 128 * 4
    assert q.rows.arenas["vec_out"].nbytes == 0 and q.rows.arenas["adapter"].nbytes == 0  # untouched kinds
    ad = o.rows.arenas["adapter"]
    assert ad.held_bytes == bucket_rows(3) * (2 * o.w_out + 4) * 4  # down | up column | down bias
    assert o.rows.arenas["vec_out"].held_bytes == 64 * 4  # the up bias row (no neutral row: none needed)
    cells = sum(a.held_bytes for layer in dm.layers.values() for a in layer.rows.arenas.values())
    assert cells == dm.footprint(delta)
    assert dm.held_bytes() == cells + sum(layer.rows.fields.nbytes for layer in (q, o))
    assert cells <= 1.25 * dm.real_bytes(delta) + 4 * 16  # + padding columns of the A|B rows
    assert all(layer.nbytes() == 0 for path, layer in dm.layers.items() if path not in (q.path, o.path))
    dm.clear(1)
    assert dm.held_bytes() == sum(layer.rows.fields.nbytes for layer in dm.layers.values())  # only slot tables
    assert dm.compact() > 0 and dm.capacity_bytes() == dm.held_bytes()


def test_dora_and_trainable_tokens_hold_their_own_rows_and_nothing_before():
    """DoRA: its LoRA's rows + one fp32 row (g | (1 - g) b0); trainable tokens: n value rows + n int64 ids per
    wrapped embedding / head; max_token_rows reserves nothing; clearing gives every cell back."""
    from delta_store.delta import RowsTerm

    dm = wrap_model(tiny_llama(), targets=("q_proj",), max_slots=4, max_rank=8, max_bottleneck=4,
                    max_token_rows=4096)
    assert dm.capacity_bytes() == 0
    q = dm.layers["model.layers.0.self_attn.q_proj"]
    emb = next(layer for layer in dm.layers.values() if isinstance(layer, DeltaEmbedding))
    md = _lora(q.in_features, q.out_features, r=4)
    md.dora_magnitude = torch.rand(q.out_features) + 0.5
    ids = torch.tensor([5, 9, 200], dtype=torch.int64)
    tokens = ModuleDelta(rows=RowsTerm(ids, torch.randn(3, emb.hidden)))
    delta = Delta({q.path: md, emb.path: tokens})
    dm.set_delta(2, delta)
    w_out32 = -(-q.out_features // 4) * 4  # fp32 columns, 16-byte aligned
    assert q.rows.arenas["dora"].held_bytes == 2 * w_out32 * 4  # one row: g | (1 - g) b0
    assert q.rows.arenas["lora"].held_bytes == 4 * (q.w_in + q.w_out) * 4
    assert emb.rows.arenas["values"].held_bytes == bucket_rows(3) * emb.hidden * 4
    assert emb.rows.arenas["ids"].held_bytes == bucket_rows(3) * 8
    cells = sum(a.held_bytes for layer in dm.layers.values() for a in layer.rows.arenas.values())
    assert cells == dm.footprint(delta)
    pages = emb.token_pages()
    start, id_start = int(pages.start[2]), int(pages.id_start[2])
    assert int(pages.count[2]) == 3 and pages.ids[id_start:id_start + 3].tolist() == [5, 9, 200]
    assert torch.equal(pages.values[start:start + 3], tokens.rows.values)
    dp = q.dora_pages()
    assert int(dp.flag[2]) == 1 and int(dp.flag[0]) == 0
    dm.clear(2)
    assert not emb.has and not q.has["dora"]
    assert dm.held_bytes() == sum(layer.rows.fields.nbytes for layer in dm.layers.values())


def test_batch_prepare_sequences_and_errors():
    dm = wrap_model(tiny_llama(), max_slots=6, max_rank=4, max_bottleneck=4, max_tokens=4)
    b = dm.batch
    with pytest.raises(InvalidArgument, match=r"slot id 0 out of range \[-1, 0\)"):
        b.prepare([0])  # no slot handed out yet
    dm.ensure_slots(6)
    b.prepare_sequences([5, -1, 0], [3, 1, 2])
    assert b.token_slots_host == [5, 5, 5, -1, 0, 0]
    assert b.meta.active_slots_host == [0, 5] and not b.no_delta
    assert b.capacity >= 6  # grew past max_tokens=4
    assert b._slots[:6].tolist() == [5, 5, 5, -1, 0, 0]
    with pytest.raises(InvalidArgument, match="slot id 6 out of range"):
        b.prepare([0, 6])
    with pytest.raises(InvalidArgument, match="2 slots for 1 sequences"):
        b.prepare_sequences([0, 1], [3])
    dm.set_delta(0, Delta({"model.layers.0.self_attn.q_proj": ModuleDelta(bias=torch.ones(64))}))
    b.prepare([0, 0, -1])
    with pytest.raises(DeltaServeError, match="prepared for 3 tokens but the layer got 5"), torch.no_grad():
        dm.model(input_ids=_ids(1, 5))
    b.reset()
    with torch.no_grad():
        dm.model(input_ids=_ids(1, 5))


def _lora(path_in: int, path_out: int, r: int = 2) -> ModuleDelta:
    return ModuleDelta(lora=LoraTerm(torch.randn(r, path_in), torch.randn(path_out, r), 1.0))


@pytest.mark.parametrize("case, modules, match", [
    ("unknown module", {"model.layers.0.self_attn.nope": ModuleDelta(bias=torch.ones(64))},
     r"model\.layers\.0\.self_attn\.nope: (no such module|not a module of the served llama)"),
    ("head takes rows only", {"lm_head": ModuleDelta(bias=torch.ones(256))},
     r"lm_head: only trainable-token rows are served here, found \['bitfit'\]"),
    ("lora A shape", {"model.layers.0.self_attn.q_proj": _lora(65, 64)},
     r"model\.layers\.0\.self_attn\.q_proj: lora\.a expected shape \(2, 64\), found \(2, 65\)"),
    ("lora B shape (GQA v_proj out 32)", {"model.layers.1.self_attn.v_proj": _lora(64, 64)},
     r"model\.layers\.1\.self_attn\.v_proj: lora\.b expected shape \(32, 2\), found \(64, 2\)"),
    ("rank above max", {"model.layers.0.self_attn.q_proj": _lora(64, 64, r=9)}, r"q_proj: LoRA rank 9 (outside \[1, max_rank=8\]|exceeds the server's max_rank 8)"),
    ("bias shape", {"model.layers.0.mlp.up_proj": ModuleDelta(bias=torch.ones(64))},
     r"up_proj: bias expected shape \(128,\), found \(64,\)"),
    ("in_scale shape", {"model.layers.0.mlp.down_proj": ModuleDelta(in_scale=torch.ones(64))},
     r"down_proj: in_scale expected shape \(128,\), found \(64,\)"),
    ("NaN", {"model.layers.0.self_attn.k_proj": ModuleDelta(bias=torch.tensor([float("nan")] * 32))},
     r"model\.layers\.0\.self_attn\.k_proj\.bias: tensor holds NaN"),
    ("adapter off-site", {"model.layers.0.self_attn.q_proj": ModuleDelta(adapter=AdapterTerm(
        torch.ones(4, 64), torch.ones(4), torch.ones(64, 4), torch.ones(64), "relu", 4.0, "residual"))},
     r"q_proj: an adapter reading 'residual'"),
    ("adapter shape", {"model.layers.0.mlp.down_proj": ModuleDelta(adapter=AdapterTerm(
        torch.ones(4, 64), torch.ones(4), torch.ones(64, 5), torch.ones(64), "relu"))},
     r"down_proj: adapter\.up expected shape \(64, 4\), found \(64, 5\)"),
    ("adapter activation", {"model.layers.0.mlp.down_proj": ModuleDelta(adapter=AdapterTerm(
        torch.ones(4, 64), torch.ones(4), torch.ones(64, 4), torch.ones(64), "tanh"))}, r"activation 'tanh'"),
    ("RMSNorm bias", {"model.layers.0.input_layernorm": ModuleDelta(bias=torch.ones(64))}, r"input_layernorm: (LlamaRMSNorm has no bias|a rmsnorm module cannot take a bias)"),
])
def test_refusals_name_module_and_shapes(case, modules, match):
    dm = wrap_model(tiny_llama(), max_slots=2, max_rank=8, max_bottleneck=8)
    good = {"model.layers.0.self_attn.q_proj": ModuleDelta(bias=torch.full((64,), 0.5))}
    dm.set_delta(1, Delta(dict(good)))
    with pytest.raises(DeltaError, match=match):
        dm.set_delta(1, Delta({**good, **modules}))
    # a refused delta leaves the slot as it was
    assert _bias_of(dm.layers["model.layers.0.self_attn.q_proj"], 1)[0].item() == 0.5
    with pytest.raises(InvalidArgument, match="slot -1 must be an integer >= 0"):
        dm.set_delta(-1, Delta(good))


def test_clear_resets_slot():
    bare = tiny_gpt2()
    dm = wrap_model(copy.deepcopy(bare), max_slots=2, max_rank=4, max_bottleneck=4)
    dm.set_delta(0, Delta({"transformer.ln_f": ModuleDelta(bias=torch.ones(64)),
                           "transformer.h.0.attn.c_attn": _lora(64, 192)}))
    dm.clear(0)
    ids = _ids(1)
    with torch.no_grad():
        dm.batch.prepare_sequences([0], [6])
        assert torch.equal(dm.model(input_ids=ids).logits, bare(input_ids=ids).logits)


def test_layer_checks_hold_without_validate():
    """The pools refuse on their own (validate() may be configured looser than the pools)."""
    dm = wrap_model(tiny_gpt2(), max_slots=2, max_rank=4, max_bottleneck=4)
    c_attn, ln_1 = dm.layers["transformer.h.0.attn.c_attn"], dm.layers["transformer.h.0.ln_1"]
    with pytest.raises(DeltaError, match=r"c_attn: lora\.b expected shape \(192, 2\), found \(64, 2\)"):
        c_attn.check(_lora(64, 64))
    with pytest.raises(DeltaError, match=r"c_attn: LoRA rank 5 outside \[1, max_rank=4\]"):
        c_attn.check(_lora(64, 192, r=5))
    big = AdapterTerm(torch.ones(5, 64), torch.ones(5), torch.ones(64, 5), torch.ones(64), "relu")
    with pytest.raises(DeltaError, match=r"mlp\.c_proj: adapter width 5 outside \[1, max_bottleneck=4\]"):
        dm.layers["transformer.h.0.mlp.c_proj"].check(ModuleDelta(adapter=big))
    with pytest.raises(DeltaError, match=r"ln_1: bias expected shape \(64,\), found \(3,\)"):
        ln_1.check(ModuleDelta(bias=torch.ones(3)))
    with pytest.raises(DeltaError, match=r"ln_1: a norm module carries only a bias delta, found \['lora'\]"):
        ln_1.check(_lora(64, 64))


def test_batch_buffer_is_refilled_in_place():
    """CUDA-graph friendly: steps of up to max_tokens tokens reuse the same slot-id storage."""
    dm = wrap_model(tiny_llama(), max_slots=4, max_rank=4, max_bottleneck=4, max_tokens=16)
    dm.ensure_slots(4)
    ptr = dm.batch._slots.data_ptr()
    index_ptr = dm.batch._index.storage.data_ptr()  # the kernels' index tensors (kernels.MetaBuffers)
    for slots in ([0] * 16, [1, -1, 3], [2] * 7):
        dm.batch.prepare(slots)
        assert dm.batch._slots.data_ptr() == ptr
        assert dm.batch.meta.token_slots.data_ptr() == ptr
        assert dm.batch.meta.token_slots.tolist() == slots
        assert dm.batch.meta.sorted_token_ids.data_ptr() == index_ptr  # the first region of the storage


def test_output_adapter_on_any_wrapped_module_and_mixed_sources():
    """An OpenDelta-style adapter on a non-site module (reads its output) next to a residual one at a site."""
    bare = tiny_llama(seed=2)
    dm = wrap_model(copy.deepcopy(bare), max_slots=3, max_rank=4, max_bottleneck=8)
    g = torch.Generator().manual_seed(0)

    def term(h, m, source, scale=1.0):
        return AdapterTerm(0.3 * torch.randn(m, h, generator=g), 0.1 * torch.randn(m, generator=g),
                           0.3 * torch.randn(h, m, generator=g), 0.1 * torch.randn(h, generator=g), "silu", scale, source)

    up = "model.layers.0.mlp.up_proj"  # out 128, not a residual site
    site = "model.layers.1.mlp.down_proj"
    d_out = Delta({up: ModuleDelta(adapter=term(128, 8, "output"))})
    d_res = Delta({site: ModuleDelta(adapter=term(64, 3, "residual", 4.0))})
    dm.set_delta(0, d_out)
    dm.set_delta(2, d_res)
    ids = _ids(3, 5)
    dm.batch.prepare_sequences([0, -1, 2], [5, 5, 5])
    with torch.no_grad():
        got = dm.model(input_ids=ids).logits
    silu = torch.nn.functional.silu
    for row, (delta, path) in ((0, (d_out, up)), (2, (d_res, site))):
        ref = copy.deepcopy(bare)
        ad = delta.modules[path].adapter
        captured = {}
        norm = ref.get_submodule("model.layers.1.post_attention_layernorm")
        norm.register_forward_pre_hook(lambda _m, a: captured.__setitem__("h", a[0]))

        def hook(_m, _a, y, ad=ad):
            src = y if ad.source == "output" else captured["h"]
            return y + ad.scale * (silu(src @ ad.down.T + ad.down_bias) @ ad.up.T + ad.up_bias)
        ref.get_submodule(path).register_forward_hook(hook)
        with torch.no_grad():
            expected = ref(input_ids=ids[row:row + 1]).logits[0]
        assert (expected - bare(input_ids=ids[row:row + 1]).logits[0]).abs().max() > 1e-3
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # same batch shape as the wrapped call: BLAS picks kernels by M
        assert torch.equal(got[1], bare(input_ids=ids).logits[1])


def test_pools_load_inside_and_outside_inference_mode():
    """The runner serves under inference_mode and the slot manager may load from anywhere: both orders work."""
    md = {"model.layers.0.self_attn.q_proj": ModuleDelta(bias=torch.ones(64))}
    with torch.inference_mode():
        dm = wrap_model(tiny_llama(), max_slots=2, max_rank=4, max_bottleneck=4)
    dm.set_delta(0, Delta(md))
    dm2 = wrap_model(tiny_llama(), max_slots=2, max_rank=4, max_bottleneck=4)
    with torch.inference_mode():
        dm2.set_delta(1, Delta(md))
        dm2.clear(1)
    dm2.set_delta(0, Delta(md))  # arenas made inside inference mode, written outside it
    for d in (dm, dm2):
        assert _bias_of(d.layers["model.layers.0.self_attn.q_proj"], 0)[0].item() == 1.0


@pytest.mark.skipif(not grouped.supported(torch.empty(0)), reason="F.grouped_mm does not run on this torch")
def test_delta_linear_stores_terms_as_rows_the_kernels_read():
    """A LoRA is rank rows of A next to B's columns; an adapter is width rows of down next to up's columns and the
    down bias: the layout the CPU backend's grouped plan reads in place (kernels/cpu/grouped.py)."""
    base = torch.nn.Linear(24, 40)
    batch = DeltaBatch(4)
    layer = DeltaLinear(base, batch, path="p", max_rank=8, max_bottleneck=8)
    g = torch.Generator().manual_seed(0)
    lora = LoraTerm(torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g), 0.5)
    ad = AdapterTerm(torch.randn(5, 40, generator=g), torch.randn(5, generator=g), torch.randn(40, 5, generator=g),
                     torch.randn(40, generator=g), "silu", 2.0, "output")
    staged = layer.stage(ModuleDelta(lora=lora, adapter=ad))
    with torch.inference_mode():
        layer.rows.grow(layer.rows.demand({t: r.shape[0] for t, r in staged.rows.items()}), 1 << 30)
        layer.place(2, staged, capacity=4)
    batch.slot_capacity = 4
    lp = layer.lora_pages()
    st = lp.start[2].item()
    assert torch.equal(lp.a_rows[st:st + 3], lora.a) and torch.equal(lp.b_rows[st:st + 3], lora.b.t())
    assert lp.rank.tolist() == [0, 0, 3, 0] and lp.max_rank == 3
    assert grouped.lora_ok(torch.empty(1, 24), lp.a_rows, lp.b_rows)
    apg = layer.adapter_pages(0)
    st = apg.start[2].item()
    assert torch.equal(apg.down_rows[st:st + 5], ad.down) and torch.equal(apg.up_rows[st:st + 5], ad.up.t())
    assert torch.equal(apg.down_bias[st:st + 5], ad.down_bias)
    assert torch.equal(apg.up_bias_rows[apg.up_bias_row[2]], ad.up_bias)
    x = torch.randn(6, 24, generator=g)
    batch.prepare([2, -1, 2, 0, -1, 2])
    with torch.no_grad():
        y = layer(x)
        want = base(x)
        rows = [0, 2, 5]
        want[rows] += 0.5 * (x[rows] @ lora.a.T) @ lora.b.T
        want[rows] += 2.0 * (F.silu(want[rows] @ ad.down.T + ad.down_bias) @ ad.up.T + ad.up_bias)
    assert_close(y, want, atol=2e-5, rtol=2e-5, what="DeltaLinear forward")
    with torch.inference_mode():
        layer.clear(2)
    assert layer.rows.held_bytes == layer.rows.fields.nbytes and not layer.has["lora"]
    assert lp.rank.tolist() == [0, 0, 0, 0]


def test_a_module_outside_the_targets_is_refused_as_not_wrapped():
    dm = wrap_model(tiny_llama(), targets=("q_proj",), max_slots=2, max_rank=8, max_bottleneck=8)
    k = "model.layers.0.self_attn.k_proj"
    with pytest.raises(DeltaError, match=f"{k}: linear module is not wrapped"):
        dm.set_delta(0, Delta({k: ModuleDelta(bias=torch.ones(32))}))
