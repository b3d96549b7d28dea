"""Graph mode (``ServerConfig.cuda_graphs``, ``server/engine/graphs.py``) where it can be checked without a GPU:
the buckets, the fixed attention buffers against ``attention.build_step``, the buffers keeping their addresses,
the layers' fixed op sequence (``forward_static``) against the eager path with every delta kind in one batch
(CPU backend and the Triton kernels under the interpreter), the plan that decides recapture, and whole engine
runs whose decode steps go through the fixed-buffer path (``DecodeGraphs(capture=False)``) giving the eager
engine's tokens and logits, with deltas loaded and evicted mid-run. The CUDA tests (skipped here) capture and
replay real graphs and compare graph-on with graph-off engines."""
from __future__ import annotations

import copy

import pytest
import torch

import kernels
from delta_store.base_spec import BaseSpec
from delta_store.delta import Delta, LoraTerm, ModuleDelta, RowsTerm
from delta_store.prompt import PromptPart
from delta_store.records import DeltaKey
from server.config import ServerConfig
from server.deltas import wrap_model
from server.deltas.residency import Residency
from server.engine import Engine
from server.engine.attention import build_step
from server.engine.graphs import DecodeGraphs, StaticStep, batch_buckets, key_bucket
from server.engine.kv_cache import KVCache, KVLayout
from server.engine.model_runner import ModelRunner
from server.types import GenerationRequest, SamplingParams
from tests.engine_helpers import LogitsRunner, run_engine_logits
from tests.helpers import assert_close, tiny_gpt2, tiny_llama
from tests.oracles import site_adapters

CUDA = torch.cuda.is_available()
CONFIG = dict(max_batch_tokens=64, max_running=6, kv_block_size=4, kv_blocks=96, max_model_len=64)


def kinds_delta(spec: BaseSpec, seed: int, kinds: set[str], rank: int = 4) -> Delta:
    """A delta with the given kinds on every linear (lora, bias, ia3, dora), residual-site adapters ("adapter")
    and trainable tokens on the embedding ("tokens"); random but seeded."""
    g = torch.Generator().manual_seed(seed)
    mods: dict[str, ModuleDelta] = {}
    if "adapter" in kinds:
        mods.update(site_adapters(spec, seed, {"ffn": ("output+residual", "relu", 1.0, 4),
                                               "attn": ("normed", "silu", 2.0, 8)}, std=0.3).modules)
    for path, info in sorted(spec.modules.items()):
        if path == spec.input_embedding and "tokens" in kinds:
            idx = torch.tensor([3, 7, 11], dtype=torch.int64)
            mods[path] = ModuleDelta(rows=RowsTerm(idx, 0.5 * torch.randn(3, info.out_features, generator=g)))
        if info.kind not in ("linear", "conv1d") or "lm_head" in path:
            continue
        md = mods.get(path, ModuleDelta())
        if kinds & {"lora", "dora"}:
            md.lora = LoraTerm(0.2 * torch.randn(rank, info.in_features, generator=g),
                               0.2 * torch.randn(info.out_features, rank, generator=g), 2.0 / rank)
        if "dora" in kinds:
            md.dora_magnitude = 1 + 0.1 * torch.randn(info.out_features, generator=g)
        if "bias" in kinds:
            md.bias = 0.1 * torch.randn(info.out_features, generator=g)
        if "ia3" in kinds:
            md.out_scale = 1 + 0.2 * torch.randn(info.out_features, generator=g)
            md.in_scale = 1 + 0.2 * torch.randn(info.in_features, generator=g)
        mods[path] = md
    return Delta(mods, "native", spec.fingerprint)


KINDS = [{"lora"}, {"lora", "bias"}, {"ia3"}, {"dora"}, {"adapter"}, {"tokens", "lora"}]


# ---- buckets and fixed buffers --------------------------------------------------------------------
def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert [key_bucket(n, 1024) for n in (1, 64, 65, 700, 1024)] == [64, 64, 128, 1024, 1024]
    assert key_bucket(100, 96) is None and key_bucket(90, 96) == 96


def test_static_step_rows_equal_build_step_and_padding_reads_the_scratch_row():
    kv = KVCache(KVLayout(1, 1, 2, 4, 32), torch.float32, "cpu")
    tables = [[5, 9, 2], [7], [3, 4]]
    starts = [9, 2, 6]  # positions of the decode tokens
    ref = build_step(kv, tables, starts, [1, 1, 1], "cpu")
    st = StaticStep(batch=4, keys=ref.decode_len, scratch_row=31 * 4, block_size=4, device="cpu")
    st.fill(tables, starts)
    s = st.step
    assert s.write_rows[:3].tolist() == ref.write_rows.tolist() and s.write_rows[3] == 124
    assert s.decode_lens.tolist() == ref.decode_lens.tolist() + [1]
    lk = ref.decode_len
    assert s.read_rows[:3 * lk].tolist() == ref.read_rows.tolist()
    assert s.read_rows[3 * lk:].tolist() == [124] * lk
    # a larger key bucket: the real rows still read their own rows (clamped to their last one), never the scratch
    big = StaticStep(batch=4, keys=16, scratch_row=124, block_size=4, device="cpu")
    big.fill(tables, starts)
    read = big.step.read_rows.view(4, 16)
    for i, (bt, p) in enumerate(zip(tables, starts)):
        own = [bt[j // 4] * 4 + j % 4 for j in range(p + 1)]
        assert read[i, :p + 1].tolist() == own and set(read[i, p + 1:].tolist()) <= {own[-1]}


def test_static_buffers_keep_their_addresses():
    base = tiny_llama(seed=1)
    spec = BaseSpec.from_model(base)
    dm = wrap_model(base, max_slots=4)
    for slot in range(3):
        dm.set_delta(slot, kinds_delta(spec, slot, {"lora"}))
    batch = dm.batch
    seen = set()
    for slots in ([0, 1, 2], [2], [-1, -1], [1, 1, 0, 2]):
        batch.prepare_static(slots, 4)
        m = batch.meta
        seen.add((batch.addresses, m.token_slots.data_ptr(), m.num_active_dev.data_ptr(),
                  tuple(t.data_ptr() for t in m.launch_index), m.num_tokens, m.grid_slots, batch.static))
        assert all(t.data_ptr() for t in m.launch_index)  # never an empty view's null address, even with no slot
        assert batch.token_slots_host == slots + [-1] * (4 - len(slots))
    assert len(seen) == 1
    batch.prepare([0, 1])
    assert not batch.static and not batch.meta.capacity


def test_prepare_static_refuses_a_step_past_its_bucket():
    dm = wrap_model(tiny_llama(seed=1), max_slots=4)
    with pytest.raises(Exception, match="exceed the bucket 2"):
        dm.batch.prepare_static([-1, -1, -1], 2)


# ---- the layers' fixed op sequence ------------------------------------------------------------------
def _served(arch: str, device: str = "cpu"):
    base = tiny_llama(seed=3) if arch == "llama" else tiny_gpt2(seed=4)
    spec = BaseSpec.from_model(base)
    dm = wrap_model(copy.deepcopy(base).to(device), max_slots=len(KINDS) + 1, max_rank=16, max_bottleneck=16)
    for slot, kinds in enumerate(KINDS):
        dm.set_delta(slot, kinds_delta(spec, 10 + slot, kinds))
    return base, dm


def _rows_logits(dm, ids: torch.Tensor, slots: list[int], bucket_rows: int | None):
    """Logits of ``ids`` [R, S] with row r on slot ``slots[r]``: eager (``bucket_rows`` None) or the static path
    with the batch padded by -1 rows up to ``bucket_rows``."""
    rows, seq = ids.shape
    if bucket_rows is None:
        dm.batch.prepare_sequences(slots, [seq] * rows)
        return dm.model(input_ids=ids).logits
    padded = torch.cat([ids, torch.zeros(bucket_rows - rows, seq, dtype=ids.dtype, device=ids.device)])
    dm.batch.prepare_static([s for s in slots for _ in range(seq)], bucket_rows * seq)
    return dm.model(input_ids=padded).logits[:rows]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_op_sequence_equals_the_eager_path_with_every_kind(arch):
    base, dm = _served(arch)
    slots = [0, -1, 1, 2, 3, 4, 5, 1, -1]  # every kind, base rows, a delta on two rows; one slot unused
    ids = torch.randint(12, 200, (len(slots), 5), generator=torch.Generator().manual_seed(2))
    ids[:, 2] = 7  # a trainable token
    with torch.no_grad():
        eager = _rows_logits(dm, ids, slots, None)
        static = _rows_logits(dm, ids, slots, 12)
        bare = base(input_ids=ids).logits
    assert_close(static, eager, atol=2e-5, rtol=2e-5, what=f"{arch} static vs eager")
    for r, s in enumerate(slots):
        if s < 0:
            assert torch.equal(static[r], bare[r]), f"row {r}: a base row changed in the static path"
        else:
            assert (eager[r] - bare[r]).abs().max() > 1e-3, f"row {r}: kinds {KINDS[s]} are a no-op"


def test_static_op_sequence_through_the_triton_kernels_equals_eager():
    """The capacity launches inside the model: the Triton kernels (the interpreter without CUDA), one decode-like
    step."""
    device = "cuda" if CUDA else "cpu"
    _, dm = _served("llama", device)
    slots = [3, 0, -1, 1, 4, 5]
    ids = torch.randint(12, 200, (len(slots), 1), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad(), kernels.backend("triton"):
        eager = _rows_logits(dm, ids, slots, None)
        static = _rows_logits(dm, ids, slots, 8)
    assert_close(static, eager, atol=2e-5, rtol=2e-5, what="triton static vs eager")


def test_the_plan_changes_with_a_layers_kinds_and_not_with_steps():
    base = tiny_llama(seed=1)
    spec = BaseSpec.from_model(base)
    dm = wrap_model(base, max_slots=4, max_rank=16)
    dm.set_delta(0, kinds_delta(spec, 1, {"lora"}))
    plan = dm.static_plan()
    dm.batch.prepare_static([0, -1], 2)
    with torch.no_grad():
        dm.model(input_ids=torch.tensor([[5, 6]]))
    assert dm.static_plan() == plan  # a step changes nothing
    dm.set_delta(1, kinds_delta(spec, 2, {"lora", "bias"}))
    with_bias = dm.static_plan()
    assert with_bias != plan  # a layer gained a kind: recapture
    dm.clear(1)
    assert dm.static_plan()[0][0] == plan[0][0]  # its last bias gone: the op leaves the sequence again


# ---- whole engine runs through the fixed-buffer path --------------------------------------------------
def _key(name: str) -> DeltaKey:
    return DeltaKey("t", name, 1, name)


def _requests(names: list[str | None], n_new: int = 6) -> list[GenerationRequest]:
    out = []
    for i, name in enumerate(names):
        prompt = [12 + (11 * i + 5 * j) % 180 for j in range(3 + i % 5)]
        prompt[1] = 7
        out.append(GenerationRequest(f"r{i}", f"t{i % 2}", prompt, SamplingParams(max_new_tokens=n_new, temperature=0),
                                     delta=None if name is None else _key(name)))
    return out


def _engine(base, deltas, *, graphs: str, device="cpu", dtype=torch.float32, hold=None):
    """graphs: "off" (eager), "static" (the fixed-buffer path run eagerly) or "capture" (CUDA graphs)."""
    config = ServerConfig(**CONFIG, cuda_graphs=graphs == "capture", device=device if graphs == "capture" else "auto")
    dm = wrap_model(copy.deepcopy(base).to(device, dtype), max_slots=config.max_running, max_rank=16,
                    max_bottleneck=16)
    sizes = sorted((dm.footprint(d) for d in deltas.values()), reverse=True)
    k = len(sizes) if hold is None else hold
    res = Residency(dm, lambda key: deltas[key.name], sum(sizes[:k]) + dm.slot_bytes * 2 * (k + 1))
    runner = ModelRunner(dm, None, config)
    if graphs == "static":
        runner.graphs = DecodeGraphs(runner, capture=False)
    return Engine(config, LogitsRunner(runner), res), res, runner


def _run(base, deltas, names, **kw):
    engine, res, runner = _engine(base, deltas, **kw)
    try:
        return run_engine_logits(engine, _requests(names)), runner
    finally:
        res.close()


def _deltas(base, kinds_list, *, prompts: bool = False):
    """``d0..``: one delta per kinds set; ``prompts``: also "p0" (5 virtual input embeddings + LoRA) and "p1" (a
    3-token K/V prefix alone, whose tokens take the layers' no-delta path)."""
    spec = BaseSpec.from_model(base)
    out = {f"d{i}": kinds_delta(spec, 40 + i, kinds, rank=(4, 8, 16)[i % 3]) for i, kinds in enumerate(kinds_list)}
    if prompts:
        g = torch.Generator().manual_seed(77)
        p0 = kinds_delta(spec, 78, {"lora"})
        p0.prompt = PromptPart(embeddings=0.5 * torch.randn(5, spec.hidden_size, generator=g))
        kv = (spec.num_layers, 3, spec.num_kv_heads, spec.head_dim)
        p1 = Delta({}, "native", spec.fingerprint, prompt=PromptPart(keys=torch.randn(*kv, generator=g),
                                                                     values=torch.randn(*kv, generator=g)))
        out.update(p0=p0, p1=p1)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_through_the_fixed_buffer_path_equals_eager(arch):
    """Concurrent requests of every kind, prompt deltas and none; a budget of 3 of the 8 deltas, so loads and
    evictions change the layers' plan mid-run (the graphs are rebuilt); every decode step that fits runs the static
    path."""
    base = tiny_llama(seed=21) if arch == "llama" else tiny_gpt2(seed=22)
    deltas = _deltas(base, KINDS, prompts=True)
    names = ["d0", None, "d1", "p0", "d2", "d3", "p1", "d4", "d5", None, "d0", "d3", "p0"]
    eager, _ = _run(base, deltas, names, graphs="off", hold=3)
    static, runner = _run(base, deltas, names, graphs="static", hold=3)
    assert runner.graphs.replays > 0 and runner.graphs.plans > 1  # loads and evictions changed the plan mid-run
    for rid, (tokens, logits) in eager.items():
        assert static[rid][0] == tokens, rid
        assert_close(static[rid][1], logits, atol=2e-5, rtol=2e-5, what=rid)


# ---- CUDA: real capture and replay (validated by a GPU session: benchmarks/gpu_check.sh) ------------------
GPU_TOL = {torch.float16: dict(atol=2e-2, rtol=2e-2), torch.bfloat16: dict(atol=8e-2, rtol=5e-2)}


def _agree(got, want, tol: dict, what: str) -> None:
    """Graph-on (tokens, logits) against graph-off: logits within ``tol`` step by step and the same tokens, except
    that a near tie in the graph-off logits (the two tokens within the tolerance) may flip under fp16/bf16
    rounding; the steps after a flip continue different text and are not compared."""
    (tokens, logits), (ref_tokens, ref_logits) = got, want
    assert len(tokens) == len(ref_tokens), what
    for k, (a, b) in enumerate(zip(tokens, ref_tokens)):
        assert_close(logits[k], ref_logits[k], **tol, what=f"{what} step {k}")
        if a != b:
            gap = float(ref_logits[k][b] - ref_logits[k][a])
            assert gap <= 2 * tol["atol"] + tol["rtol"] * float(ref_logits[k][b].abs()), \
                f"{what} step {k}: token {a} vs {b}, not a tie (gap {gap:.3g})"
            return


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_graphs_on_equal_graphs_off(dtype):
    base = tiny_llama(seed=31)
    deltas = _deltas(base, KINDS, prompts=True)
    names = ["d0", None, "d1", "p0", "d2", "d3", "p1", "d4", "d5", None, "d0", "d3", "p0"]
    off, _ = _run(base, deltas, names, graphs="off", device="cuda", dtype=dtype, hold=3)
    on, runner = _run(base, deltas, names, graphs="capture", device="cuda", dtype=dtype, hold=3)
    assert runner.graphs.captures >= 1 and runner.graphs.replays > runner.graphs.captures
    assert not runner.graphs.disabled
    for rid in off:
        _agree(on[rid], off[rid], GPU_TOL[dtype], f"{rid} {dtype}")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_replay_after_a_delta_is_replaced_and_deleted():
    """One engine keeps serving across rounds: d0 is replaced by d2 (a new version: same kinds, new values) and d1
    (LoRA + bias) is deleted (its bias ops leave the layers' sequence: recapture); every round gives the tokens
    and logits a graph-off engine gives."""
    base = tiny_llama(seed=32)
    deltas = _deltas(base, [{"lora"}, {"lora", "bias"}, {"lora"}])
    eng_on, res_on, runner = _engine(base, deltas, graphs="capture", device="cuda", dtype=torch.float16)
    eng_off, res_off, _ = _engine(base, deltas, graphs="off", device="cuda", dtype=torch.float16)
    try:
        replays = []
        for round_, names in enumerate((["d0", "d1", None, "d0"], ["d2", None, "d2"])):
            reqs = _requests(names)
            for r in reqs:
                r.request_id += f"-{round_}"
            got, want = run_engine_logits(eng_on, reqs), run_engine_logits(eng_off, copy.deepcopy(reqs))
            for rid in want:
                _agree(got[rid], want[rid], GPU_TOL[torch.float16], f"round {round_} {rid}")
            replays.append(runner.graphs.replays)
            for res in (res_on, res_off):  # replace d0 by d2, delete d1
                res.invalidate(_key("d0"))
                res.invalidate(_key("d1"))
        assert replays[1] > replays[0] > 0 and not runner.graphs.disabled
    finally:
        res_on.close()
        res_off.close()
