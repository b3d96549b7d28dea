"""Row arenas (server/deltas/pages.py) and the layers on them: the bucket ladder's 1.25x bound, cells that keep
their contents through growth and compaction, growth bounded by the room given, no memory before the first term,
and a model whose arenas are fragmented by load/evict churn serving every resident delta exactly."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from delta_store.base_spec import BaseSpec
from server.deltas import wrap_model
from server.deltas.pages import BUCKETS, MAX_WASTE, NoRoom, RowArena, bucket_rows
from tests.helpers import assert_close, random_delta, tiny_llama
from tests.kernel_cases import dense_lora


def test_every_rank_sits_in_a_bucket_at_most_1_25x_and_the_usual_ranks_exactly():
    assert all(n <= bucket_rows(n) <= MAX_WASTE * n for n in range(1, 5000))
    assert all(bucket_rows(r) == r for r in (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 1024))
    assert list(BUCKETS) == sorted(set(BUCKETS))
    with pytest.raises(ValueError, match="outside"):
        bucket_rows(0)


def _fill(arena: RowArena, cell, value: float) -> None:
    arena.write(cell, torch.full((cell.rows, arena.width), value))


def _check(arena: RowArena, cells: dict) -> None:
    for value, cell in cells.items():
        a = arena.start(cell)
        assert torch.equal(arena.rows[a:a + cell.rows], torch.full((cell.rows, arena.width), value)), value


def test_cells_keep_their_contents_through_growth_and_compaction():
    arena = RowArena(8, torch.float32, "cpu")
    assert arena.rows is None and arena.nbytes == 0 and arena.alloc(4) is None  # nothing until a term comes
    rng = random.Random(0)
    live: dict[float, object] = {}
    for i in range(200):
        if live and rng.random() < 0.4:
            value = rng.choice(list(live))
            arena.free(live.pop(value))
            continue
        n = rng.choice([1, 3, 4, 5, 13, 16, 40, 64])
        cell = arena.alloc(n)
        if cell is None:
            arena.grow([n], room_bytes=1 << 30)
            cell = arena.alloc(n)
        _fill(arena, cell, float(i))
        live[float(i)] = cell
        _check(arena, live)
    assert arena.held_bytes == sum(bucket_rows(c.rows) for c in live.values()) * arena.row_bytes
    freed = arena.compact()
    assert freed >= 0 and arena.nbytes == arena.held_bytes  # exactly the live cells
    _check(arena, live)
    for cell in live.values():
        arena.free(cell)
    arena.compact()
    assert arena.rows is None and arena.nbytes == 0


def test_growth_stays_within_the_room_and_fails_cleanly():
    arena = RowArena(16, torch.float32, "cpu")
    row = arena.row_bytes
    with pytest.raises(NoRoom, match="more rows need"):
        arena.grow([16], room_bytes=15 * row)
    assert arena.rows is None
    added = arena.grow([16], room_bytes=16 * row)  # exactly what one cell needs: no slack
    assert added == 16 * row and arena.alloc(16) is not None and arena.alloc(16) is None
    added = arena.grow([16], room_bytes=1 << 20)  # room to spare: the region doubles, at least
    assert added >= 16 * row * 2 - 16 * row and len(arena.regions[16].free) >= 2


def test_free_twice_is_refused():
    arena = RowArena(4, torch.float32, "cpu")
    arena.grow([4], 1 << 20)
    cell = arena.alloc(4)
    arena.free(cell)
    with pytest.raises(ValueError, match="not allocated"):
        arena.free(cell)


def test_model_arenas_fragmented_by_churn_serve_every_resident_delta_exactly():
    """Random loads and evictions of mixed-rank deltas (1-64) leave holes and relayouts behind; after each round
    every resident delta's pages read back as its own tensors, and a batch mixing them equals each alone."""
    base = tiny_llama(seed=4)
    spec = BaseSpec.from_model(base)
    dm = wrap_model(copy.deepcopy(base), max_slots=16, max_rank=64)
    rng = random.Random(1)
    ranks = [1, 3, 4, 5, 7, 8, 13, 16, 24, 32, 40, 64]
    deltas = {i: random_delta(spec, rank=ranks[i % len(ranks)], seed=i, bias=i % 3 == 0,
                              targets=("q_proj", "v_proj", "down_proj") if i % 2 else ("q_proj", "k_proj"))
              for i in range(24)}
    resident: dict[int, int] = {}  # delta -> slot
    free_slots = list(range(8))
    for _round in range(6):
        for _ in range(6):
            if resident and (not free_slots or rng.random() < 0.45):
                d = rng.choice(list(resident))
                slot = resident.pop(d)
                dm.clear(slot)
                free_slots.append(slot)
            else:
                d = rng.choice([i for i in deltas if i not in resident])
                slot = free_slots.pop(rng.randrange(len(free_slots)))
                dm.ensure_slots(slot + 1)
                dm.install([(slot, dm.stage(deltas[d]))], room=1 << 30)
                resident[d] = slot
        if _round % 2:
            dm.compact()
        for d, slot in resident.items():
            for path, md in deltas[d].modules.items():
                if md.lora is None:
                    continue
                a, b = dense_lora(dm.layers[path].lora_pages())
                r = md.lora.rank
                assert torch.equal(a[slot, :r], md.lora.a) and torch.equal(b[slot, :, :r], md.lora.b), (d, path)
    ids = torch.randint(0, 256, (len(resident), 5), generator=torch.Generator().manual_seed(0))
    order = sorted(resident.items())
    dm.batch.prepare_sequences([slot for _, slot in order], [5] * len(order))
    with torch.no_grad():
        mixed = dm.model(input_ids=ids).logits
    for row, (d, _slot) in enumerate(order):
        alone = wrap_model(copy.deepcopy(base), max_slots=1, max_rank=64)
        alone.set_delta(0, deltas[d])
        alone.batch.prepare_sequences([0], [5])
        with torch.no_grad():
            want = alone.model(input_ids=ids[row:row + 1]).logits[0]
        assert_close(mixed[row], want, atol=2e-5, rtol=2e-5, what=f"delta {d} in the mixed batch")
