"""Siblings on one input (q/k/v, gate/up) sharing one LoRA shrink (``server/deltas/shared_input.py``): a wrapped
Llama / Qwen2 model gives the same logits with fusion as without (within 1e-5), base-only rows stay bit-equal
to the bare model, PEFT parity holds on an MHA model where q/k/v form one group, the stacks cost what the
members held apart, and replacing / deleting / compacting never serves stale stacked rows."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import kernels
from delta_store.base_spec import BaseSpec
from delta_store.delta import Delta, LoraTerm, ModuleDelta
from kernels.cpu import force_plan
from kernels.cpu.looped import LONG_RUN
from server.deltas import wrap_model
from server.deltas.linear import DeltaLinear
from tests.helpers import TOLERANCES, assert_close, import_delta, tiny_llama
from tests.oracles import randomise_peft

FUSED_TOL = dict(atol=1e-5, rtol=0.0)
SEQ = 5
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _delta(spec, seed: int, ranks: dict[str, int]) -> Delta:
    """LoRA on the leaves of ``ranks`` (leaf -> rank; 0 or absent = none), seeded."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for path, info in sorted(spec.modules.items()):
        r = ranks.get(path.rsplit(".", 1)[-1], 0)
        if info.kind != "linear" or info.layer is None or not r:
            continue
        a = 0.2 * torch.randn(r, info.in_features, generator=g)
        b = 0.2 * torch.randn(info.out_features, r, generator=g)
        mods[path] = ModuleDelta(lora=LoraTerm(a, b, 1.5 / r))
    return Delta(mods, "native", spec.fingerprint)


DELTAS = [
    {leaf: 4 for leaf in ALL},  # every member, one rank
    {"q_proj": 8, "v_proj": 3, "up_proj": 5},  # members missing, different ranks
    {"k_proj": 2, "gate_proj": 16, "up_proj": 1, "o_proj": 4},
    {"v_proj": 6},  # a group with one member of LoRA, the leader without
]


def _pair(model_type: str, kv_heads: int):
    base = tiny_llama(seed=3, model_type=model_type, heads=4, kv_heads=kv_heads)
    fused = wrap_model(copy.deepcopy(base), max_slots=8, max_rank=16)
    plain = wrap_model(copy.deepcopy(base), max_slots=8, max_rank=16, fuse_siblings=False)
    return base, fused, plain


def _forward(dm, ids, slots, lengths):
    dm.batch.prepare_sequences(slots, lengths)
    flat = torch.cat([ids[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)
    with torch.no_grad():
        return dm.model(input_ids=flat).logits[0]


@pytest.mark.parametrize("model_type,kv_heads", [("llama", 4), ("qwen2", 2), ("mistral", 1)])
def test_fused_logits_equal_unfused_and_base_rows_bit_equal(model_type, kv_heads):
    base, fused, plain = _pair(model_type, kv_heads)
    groups = {tuple(p.rsplit(".", 1)[-1] for p in g.paths) for g in fused.groups}
    want = {("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj") if kv_heads == 4 else ("k_proj", "v_proj")}
    assert groups == want and not plain.groups
    spec = BaseSpec.from_model(base)
    slots = [5, 0, 2, 7]  # out of order, with gaps
    for dm in (fused, plain):
        for slot, ranks in zip(slots, DELTAS):
            dm.set_delta(slot, _delta(spec, slot, ranks))
    ids = torch.randint(0, 256, (6, SEQ), generator=torch.Generator().manual_seed(1))
    calls = []
    real = kernels.shrink_lora

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    # prefill of several sequences with base rows mixed in, then a decode-like step of one token each
    for seq_slots, lengths in (([-1, 5, 0, 2, 7, 5], [SEQ] * 6), ([7, 5, -1, 0, 2, 0], [1] * 6),
                               ([-1, 2, 2, 0, 0, -1], [SEQ, 1, 1, 2, 1, SEQ])):
        calls.clear()
        kernels.shrink_lora = counted
        try:  # grouped forced: unforced, the decode-like steps take the strided plan, which never shares (below)
            with force_plan("grouped"):
                got = _forward(fused, ids, seq_slots, lengths)
        finally:
            kernels.shrink_lora = real
        expected = _forward(plain, ids, seq_slots, lengths)
        assert_close(got, expected, **FUSED_TOL, what=f"{model_type} slots={seq_slots}")
        assert calls, "the fused path never ran"
        assert len(calls) <= len(fused.groups)  # at most one shrink per group and forward
        with torch.no_grad():  # the same packed tokens through the bare model (one causal sequence, as above)
            bare = base(input_ids=torch.cat([ids[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)).logits[0]
        if seq_slots[0] == -1:
            n = lengths[0]
            assert torch.equal(got[:n], bare[:n]), "base-only rows must equal the bare model bit for bit"


def test_one_shrink_per_group_per_forward():
    base, fused, _ = _pair("llama", 4)
    spec = BaseSpec.from_model(base)
    fused.set_delta(0, _delta(spec, 0, {leaf: 4 for leaf in ALL}))
    seen = []
    real = kernels.shrink_lora
    kernels.shrink_lora = lambda x, pages, meta: (seen.append(len(pages.members)), real(x, pages, meta))[1]
    n = 2 * LONG_RUN  # a prefill run: shorter ones take one native loop per member on the CPU (kernels.step_ops)
    try:
        _forward(fused, torch.ones(1, n, dtype=torch.long), [0], [n])
    finally:
        kernels.shrink_lora = real
    assert sorted(seen) == [2, 2, 3, 3]  # per layer: gate/up (2 members) and q/k/v (3): 2 layers
    assert all(g._live is None for g in fused.groups), "the kept shrink must not outlive its last member"


def test_stacks_cost_what_the_members_held_apart():
    base, fused, plain = _pair("llama", 4)
    spec = BaseSpec.from_model(base)
    for ranks in DELTAS:
        d = _delta(spec, 1, ranks)
        for dm in (fused, plain):
            before = dm.held_bytes()
            dm.set_delta(0, d)
            assert dm.held_bytes() - before <= dm.footprint(d) + dm.slot_bytes
            dm.clear(0)
        # D13: the stack of a slot holds its members' real rows (same row width as apart), bucketed once
        rows = sum(md.lora.rank * fused.layers[p].rows.arenas["lora"].row_bytes for p, md in d.modules.items())
        assert rows <= fused.footprint(d) <= 1.25 * rows, ranks


def test_replace_delete_and_compact_never_serve_stale_stacks():
    base, fused, plain = _pair("qwen2", 4)
    spec = BaseSpec.from_model(base)
    ids = torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(4))
    seq_slots = [1, 3, 1]

    def same(tag):
        got = _forward(fused, ids, seq_slots, [SEQ] * 3)
        assert_close(got, _forward(plain, ids, seq_slots, [SEQ] * 3), **FUSED_TOL, what=tag)
        return got

    for dm in (fused, plain):
        dm.set_delta(1, _delta(spec, 10, DELTAS[0]))
        dm.set_delta(3, _delta(spec, 11, DELTAS[1]))
    first = same("installed")
    for dm in (fused, plain):  # replace slot 1 by a delta of other ranks and members: its stack changes size
        dm.set_delta(1, _delta(spec, 12, DELTAS[2]))
    assert (same("replaced") - first).abs().max() > 1e-3
    for dm in (fused, plain):  # churn: more deltas, a delete, then compaction moves every cell
        for slot in (0, 2, 4):
            dm.set_delta(slot, _delta(spec, 20 + slot, DELTAS[slot % len(DELTAS)]))
        dm.clear(0)
        dm.clear(3)
        dm.compact()
    deleted = same("deleted and compacted")
    seq_slots[:] = [3, 1, 1]  # slot 3 is empty now: its tokens (first in the packed sequence) run the bare model
    deleted = same("deleted, first")
    with torch.no_grad():
        bare = base(input_ids=ids.reshape(1, -1)).logits[0]
    assert torch.equal(deleted[:SEQ], bare[:SEQ]), "a deleted slot's tokens run the bare model"
    for dm in (fused, plain):
        dm.set_delta(3, _delta(spec, 30, DELTAS[3]))
    same("reinstalled after compaction")


def test_a_sibling_called_on_another_tensor_is_exact_unfused():
    base, fused, plain = _pair("llama", 4)
    spec = BaseSpec.from_model(base)
    d = _delta(spec, 2, {leaf: 3 for leaf in ALL})
    fused.set_delta(0, d)
    plain.set_delta(0, d)
    q = fused.layers["model.layers.0.self_attn.q_proj"]
    k = fused.layers["model.layers.0.self_attn.k_proj"]
    q_plain = plain.layers["model.layers.0.self_attn.q_proj"]
    k_plain = plain.layers["model.layers.0.self_attn.k_proj"]
    assert isinstance(q, DeltaLinear) and q.shared is k.shared
    for dm in (fused, plain):
        dm.batch.prepare([0, 0, 0])
    x, x_other = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        got = (q(x), k(x_other), k(x), q(x_other))
        want = (q_plain(x), k_plain(x_other), k_plain(x), q_plain(x_other))
    for g, w in zip(got, want):
        assert_close(g, w, **FUSED_TOL, what="sibling on another tensor")


def test_peft_parity_with_qkv_in_one_group(tmp_path):
    base = tiny_llama(seed=5, heads=4, kv_heads=4)
    spec = BaseSpec.from_model(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
                     rank_pattern={"k_proj": 2, "model.layers.1.mlp.up_proj": 6})
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomise_peft(pm, 9)
    pm.eval()
    pm.save_pretrained(tmp_path / "a")
    delta = import_delta(tmp_path / "a", spec)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = pm(input_ids=ids[:1]).logits[0]
        bare = base(input_ids=ids[1:]).logits[0]
    dm = wrap_model(base, max_slots=4, max_rank=16)
    assert {len(g.members) for g in dm.groups} == {2, 3}
    dm.set_delta(2, delta)
    dm.batch.prepare_sequences([2, -1], [7, 7])
    with torch.no_grad():
        got = dm.model(input_ids=ids).logits
    assert_close(got[0], expected, atol=TOLERANCES[torch.float32]["atol"], what="PEFT row")
    assert torch.equal(got[1], bare)


def test_a_freed_stack_cell_reused_by_another_slot_serves_its_rows():
    """A slot installed into a cell another slot freed (no growth, no relayout: every pages object is kept) is served
    from its own rows: the members' host mirrors of ``lora_start`` (kernels.pages.HOST_MIRRORS), rewritten by
    ``SharedInput.sync``, are the very lists the kept pages read."""
    base, fused, plain = _pair("llama", 4)
    spec = BaseSpec.from_model(base)
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(6))
    ranks = {leaf: 4 for leaf in ALL}
    for dm in (fused, plain):
        dm.ensure_slots(4)  # the slot tables hold slot 2 from the start: nothing grows below
        dm.set_delta(0, _delta(spec, 40, ranks))
        dm.set_delta(1, _delta(spec, 41, ranks))
    for tag, slots in (("two slots", [0, 1]), ("again", [1, 0])):
        assert_close(_forward(fused, ids, slots, [SEQ] * 2), _forward(plain, ids, slots, [SEQ] * 2), **FUSED_TOL,
                     what=tag)
    q = fused.layers["model.layers.0.self_attn.q_proj"]
    held = q.rows.capacity_bytes
    for dm in (fused, plain):
        dm.clear(1)
        dm.set_delta(2, _delta(spec, 42, ranks))  # slot 1's freed cells, same ranks: nothing grows or moves
    assert q.rows.capacity_bytes == held
    assert_close(_forward(fused, ids, [2, 0], [SEQ] * 2), _forward(plain, ids, [2, 0], [SEQ] * 2), **FUSED_TOL,
                 what="slot 2 in slot 1's freed cells")


def test_a_strided_decode_step_runs_each_member_alone_on_cpu():
    """Where each member's own op takes the CPU's strided decode plan (fp32, few tokens a slot), the group does not
    share its shrink (the packed op has no strided plan: 2x slower there), and the logits are the unfused ones."""
    base, fused, plain = _pair("llama", 4)
    spec = BaseSpec.from_model(base)
    for dm in (fused, plain):
        for slot in range(6):
            dm.set_delta(slot, _delta(spec, 50 + slot, {leaf: 4 for leaf in ALL}))
    ids = torch.randint(0, 256, (6, SEQ), generator=torch.Generator().manual_seed(8))
    slots, lengths = [3, 0, 5, 1, 4, 2], [1] * 6  # decode: one token on each of 6 distinct slots
    fused.batch.prepare_sequences(slots, lengths)
    assert kernels.cpu.choose_plan(fused.batch.meta) == "strided"
    calls = []
    real = kernels.shrink_lora
    kernels.shrink_lora = lambda *a: (calls.append(1), real(*a))[1]
    try:
        got = _forward(fused, ids, slots, lengths)
    finally:
        kernels.shrink_lora = real
    assert not calls
    assert_close(got, _forward(plain, ids, slots, lengths), **FUSED_TOL, what="strided decode, members alone")
