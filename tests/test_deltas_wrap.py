"""wrap_model structure, the DeltaBatch, exact no-delta equality and the load-path refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from delta_store.delta import ADAPTER_SOURCES, AdapterTerm, Delta, LoraTerm, ModuleDelta
from delta_store.errors import DeltaError, DeltaServeError, InvalidArgument
from kernels.cpu import grouped
from server.deltas import DeltaBatch, DeltaEmbedding, DeltaHead, DeltaLinear, DeltaNorm, wrap_model
from tests.helpers import assert_close, tiny_gpt2, tiny_llama

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


def test_pool_bytes_match_documented_formula():
    S, R = 4, 8
    dm = wrap_model(tiny_llama(), targets=("q_proj",), max_slots=S, max_rank=R, max_bottleneck=4)
    q = dm.layers["model.layers.0.self_attn.q_proj"]
    fin, fout = q.in_features, q.out_features
    assert q.nbytes() == S * (R * (fin + fout) + 2 * fout + fin) * 4 + S * 8
    before = dm.pool_bytes()
    o = dm.layers["model.layers.0.self_attn.o_proj"]
    ad = AdapterTerm(torch.randn(3, 64), torch.randn(3), torch.randn(64, 3), torch.randn(64), "relu")
    dm.set_delta(1, Delta({o.path: ModuleDelta(adapter=ad)}))
    # adapter pools appear on first use: down/up [S,M,h] x2, biases [S,M]+[S,h], act [S], scale/width [sources,S]
    n = len(ADAPTER_SOURCES)
    assert dm.pool_bytes() - before == (2 * S * 4 * 64 + S * 4 + S * 64) * 4 + S * 4 + 2 * n * S * 4


def test_batch_prepare_sequences_and_errors():
    dm = wrap_model(tiny_llama(), max_slots=6, max_rank=4, max_bottleneck=4, max_tokens=4)
    b = dm.batch
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
    assert dm.layers["model.layers.0.self_attn.q_proj"].bias_delta[1, 0].item() == 0.5
    with pytest.raises(InvalidArgument, match="slot 2 out of range"):
        dm.set_delta(2, Delta(good))


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
    assert dm.layers["model.layers.0.self_attn.q_proj"].bias_delta[0, 0].item() == 1.0


@pytest.mark.skipif(not grouped.supported(torch.empty(0)), reason="F.grouped_mm does not run on this torch")
def test_delta_linear_pools_store_b_and_up_as_rows():
    """LoRA B and adapter up pools are stored [S, R, out] rows, the kernels' [S, out, R] views transposes of
    them: the layout the CPU backend's grouped plan reads in place (kernels/cpu/grouped.py)."""
    base = torch.nn.Linear(24, 40)
    layer = DeltaLinear(base, DeltaBatch(4), path="p", max_slots=4, max_rank=8, max_bottleneck=8)
    g = torch.Generator().manual_seed(0)
    lora = LoraTerm(torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g), 0.5)
    ad = AdapterTerm(torch.randn(5, 40, generator=g), torch.randn(5, generator=g), torch.randn(40, 5, generator=g),
                     torch.randn(40, generator=g), "silu", 2.0, "output")
    layer.set_delta(2, ModuleDelta(lora=lora, adapter=ad))
    for view, rows, want, r in ((layer.lora_b, layer.lora_b_rows, lora.b, 3),
                                (layer.adapters.up, layer.adapters.up_rows, ad.up, 5)):
        assert rows.is_contiguous() and view.data_ptr() == rows.data_ptr()  # a view, nothing copied
        assert torch.equal(view[2, :, :r], want) and view[2, :, r:].eq(0).all() and view[[0, 1, 3]].eq(0).all()
    assert grouped.lora_ok(torch.empty(1, 24), layer.lora_a, layer.lora_b)
    x = torch.randn(6, 24, generator=g)
    layer.batch.prepare([2, -1, 2, 0, -1, 2])
    with torch.no_grad():
        y = layer(x)
        want = base(x)
        rows = [0, 2, 5]
        want[rows] += 0.5 * (x[rows] @ lora.a.T) @ lora.b.T
        want[rows] += 2.0 * (F.silu(want[rows] @ ad.down.T + ad.down_bias) @ ad.up.T + ad.up_bias)
    assert_close(y, want, atol=2e-5, rtol=2e-5, what="DeltaLinear forward")
    layer.clear(2)
    assert layer.lora_b_rows.eq(0).all() and layer.adapters.up_rows.eq(0).all()
    assert layer.nbytes() == 4 * (8 * (24 + 40) + 2 * 40 + 24) * 4 + 4 * 8 + layer.adapters.nbytes()


def test_a_module_outside_the_targets_is_refused_as_not_wrapped():
    dm = wrap_model(tiny_llama(), targets=("q_proj",), max_slots=2, max_rank=8, max_bottleneck=8)
    k = "model.layers.0.self_attn.k_proj"
    with pytest.raises(DeltaError, match=f"{k}: linear module is not wrapped"):
        dm.set_delta(0, Delta({k: ModuleDelta(bias=torch.ones(32))}))
