"""The strided plan's blocks (``strided.py``): which cells of the pages each of its bmm pairs covers, for one step's
tokens and the pages' host tables.

Blocks. The active cells of one rank (D3: one true rank ``r`` per bmm, never a row past a slot's rank) are cut
into *blocks*: ``cells`` cells evenly spaced ``stride`` rows apart from the start of the block's first member,
every cell padded to the block's ``L`` tokens. One block is one bmm pair (``strided.py``).

Cost model, in weight rows read: a block costs ``BLOCK_ROWS + cells * (r + TOKEN_ROWS * L)``; a member joins the
current block (its start on the block's lattice, the gcd of the gaps) when the merged block costs no more than
the two apart. So a hot slot with many tokens gets a block of its own instead of padding every cell to its
count, and a fragmented region is cut where the holes cost more than a block. The blocks depend only on the
layout relative to each rank's first start and on the per-slot token counts, so they are built once per token
layout, shared by every layer with that layout and kept for the next steps with the same tokens (decode steps
repeat their batch: ``_layout_cache``), and so are the views of the scratch buffers (``strided._scratch``); the cell
views are kept per pages object (``strided._cells``).
"""
from __future__ import annotations

import math

import torch

from ..meta import DeltaKernelMeta

BLOCK_ROWS = 24
"""A block's fixed cost in weight rows: its two bmm calls cost ~9 us of dispatch on an idle core, the time to read
~24 rows of 2048 fp32 (q_proj's A and B rows) at ~20 GB/s. With rank 16 one free cell between two members costs
16 rows + its padding, less than a new block, so it is computed and dropped; two free cells are not. Measured on
the seven projections of the CPU benchmark model, 32 of 97 cells active (bench_kernels' regions layout), loaded
machine: 12 -> 15 blocks 5.1-6.0 ms, 24 -> 10 blocks 5.6-6.1, 48 -> 8 blocks 6.6-7.5, 96 -> 5 blocks 8.3-8.5:
a free cell read costs about what a block does, so larger values only add bytes."""

TOKEN_ROWS = 4
"""A padded token row's cost in weight rows: measured, rank 16, 1024 -> 1024, 32 cells, bmm pair 198 us at one
token a cell, 270 at 4 and 359 at 8, i.e. ~0.7 us a token row against ~0.2 us a weight row (its x row gathered,
its d row written and added back cost more than the bmm's share). Zipf popularity, 32 tokens on 8 slots: 2 ->
0.49 ms (50 padded rows), 4 -> 0.43 (36 rows), 8 -> 0.42, 16 -> 0.46 (33 rows, 4 blocks)."""


class Block:
    """One bmm pair: ``cells`` cells ``stride`` rows apart from the start of slot ``head``, ``tokens`` rows a cell,
    padded rows ``pos`` .. ``pos + cells * tokens`` of the plan; ``hoff`` its first element in its rank's ``h``."""

    __slots__ = ("head", "stride", "cells", "tokens", "pos", "hoff")

    def __init__(self, head: int, stride: int, cells: int, tokens: int, pos: int, hoff: int):
        self.head, self.stride, self.cells, self.tokens, self.pos, self.hoff = head, stride, cells, tokens, pos, hoff


class Rank:
    """The blocks of one rank (or width) ``size``: padded rows ``pos`` .. ``pos + rows`` of the plan, ``h`` elements
    ``hpos`` .. ``hpos + rows * size`` (one [rows, size] matrix), ``members`` its slots."""

    __slots__ = ("size", "blocks", "pos", "rows", "hpos", "members")

    def __init__(self, size: int, blocks: list[Block], pos: int, rows: int, hpos: int, members: list[int]):
        self.size, self.blocks, self.pos, self.rows, self.hpos, self.members = size, blocks, pos, rows, hpos, members


class Plan:
    """A step's blocks for one layout: padded rows in rank, block, cell, token order."""

    __slots__ = ("ranks", "rows", "hrows", "src", "slots", "real", "tok", "pads", "blocks", "views")

    def __init__(self, ranks: list[Rank], rows: int, hrows: int, src: torch.Tensor | None, slots: torch.Tensor,
                 real: torch.Tensor | None, tok: torch.Tensor | None, pads: torch.Tensor | None):
        self.ranks = ranks
        self.rows = rows  # padded token rows P
        self.hrows = hrows  # elements of h: sum of rows * size over the ranks
        self.src = src  # int64 [P] token of each padded row (a pad repeats a real token); None: x itself, in order
        self.slots = slots  # int64 [P] slot of each padded row (a pad: its block's first member)
        self.real = real  # int64 [n] padded rows that hold a real token; None: all of them
        self.tok = tok  # int64 [n] token of each real row; None: token i is row i (every token, in order)
        self.pads = pads  # int64 [P - n] padded rows that hold no token; None: none
        self.blocks = [(rk.size, blk) for rk in ranks for blk in rk.blocks]  # (rank, block) in row order
        self.views: dict = {}  # views of this thread's scratch buffers, by buffer (``_scratch``)


_LAYOUTS: dict[tuple, dict] = {}  # (device, inference mode, T, runs) -> that token layout's plans, across steps
MAX_LAYOUTS = 32
"""Token layouts whose plans are kept across steps (oldest dropped first). Decode steps repeat their batch's layout
until a sequence joins or leaves, and a plan is a function of the layout and the pages' host tables only: built per
step it cost 7 builds (~1.5 ms) of each 108 ms decode step of the served mix (32 deltas, CPU benchmark model)."""


def _layout_cache(meta: DeltaKernelMeta) -> dict:
    """The plans of ``meta``'s token layout: this step's meta first (its memo), then an earlier step's with the same
    runs."""
    mode = torch.is_inference_mode_enabled()
    cache = meta.memo.get(("layout", mode))
    if cache is None:
        key = (meta.token_slots.device, mode, meta.num_tokens, tuple(meta.runs_host))
        cache = _LAYOUTS.get(key)
        if cache is None:
            if len(_LAYOUTS) >= MAX_LAYOUTS:
                del _LAYOUTS[next(iter(_LAYOUTS))]
            cache = _LAYOUTS[key] = {}
        meta.memo[("layout", mode)] = cache
    return cache


def plan(meta: DeltaKernelMeta, sizes: dict[int, int], starts: dict[int, int], work: list[int]) -> Plan:
    """The blocks of ``meta`` for per-slot ``sizes`` (rank or width) and run ``starts`` (host dicts over the active
    slots) restricted to ``work`` (active slots with size > 0); cached per token layout (``_layout_cache``), first
    by the absolute layout (the wrapped projections of a model usually place the step's deltas at the same rows:
    one lookup), then by the layout relative to each rank's first start (layers whose regions start elsewhere)."""
    cache = _layout_cache(meta)
    fast = ("at", tuple(work), tuple([sizes[s] for s in work]), tuple([starts[s] for s in work]))
    hit = cache.get(fast)
    if hit is None:
        by_size: dict[int, list[int]] = {}
        for s in work:
            by_size.setdefault(sizes[s], []).append(s)
        key = []
        for r in sorted(by_size):
            group = by_size[r]
            base = min(starts[s] for s in group)
            key.append((r, tuple(sorted((starts[s] - base, s) for s in group))))
        key = tuple(key)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = _build(meta, key)
        cache[fast] = hit
    return hit


def _cost(cells: int, tokens: int, size: int) -> int:
    return BLOCK_ROWS + cells * (size + TOKEN_ROWS * tokens)


def _blocks(members: tuple[tuple[int, int], ...], counts: dict[int, int], size: int):
    """(stride, [(cell, slot)], tokens) per block for ``members`` = (start, slot) in start order: a member joins the
    current block when the merged block costs no more than the two apart (``_cost``)."""
    (first, s0), rest = members[0], members[1:]
    cur, stride, tokens = [(0, s0)], 0, counts[s0]
    for a, s in rest:
        gap = a - first
        if gap > 0:
            g = math.gcd(stride, gap)
            t = max(tokens, counts[s])
            if _cost(gap // g + 1, t, size) <= _cost(cur[-1][0] + 1, tokens, size) + _cost(1, counts[s], size):
                k = stride // g if stride else 1
                cur = [(c * k, m) for c, m in cur] + [(gap // g, s)]
                stride, tokens = g, t
                continue
        yield stride or size, cur, tokens
        cur, stride, tokens, first = [(0, s)], 0, counts[s], a
    yield stride or size, cur, tokens


def _build(meta: DeltaKernelMeta, key) -> Plan:
    dev = meta.token_slots.device
    seg = {s: k for k, s in enumerate(meta.active_slots_host)}
    sh = meta.seg_start_host
    sorted_ids = meta.sorted_active_ids.tolist()
    tokens_of = {s: sorted_ids[sh[seg[s]]:sh[seg[s] + 1]] for _, group in key for _, s in group}
    counts = {s: len(t) for s, t in tokens_of.items()}
    src: list[int] = []  # token of each padded row
    slot_of: list[int] = []
    real: list[int] = []
    ranks: list[Rank] = []
    hpos = 0
    for size, group in key:
        rank_pos = len(src)
        blocks = []
        for stride, cells, tokens in _blocks(group, counts, size):
            head, n_cells = cells[0][1], cells[-1][0] + 1
            blocks.append(Block(head, stride, n_cells, tokens, len(src), (len(src) - rank_pos) * size))
            at = dict(cells)
            for c in range(n_cells):
                s = at.get(c)
                ids = tokens_of[s] if s is not None else ()
                for j in range(tokens):
                    if j < len(ids):
                        real.append(len(src))
                        src.append(ids[j])
                    else:
                        src.append(tokens_of[head][0])  # a pad repeats a real token's row: finite
                    slot_of.append(head if s is None else s)
        rows = len(src) - rank_pos
        ranks.append(Rank(size, blocks, rank_pos, rows, hpos, [s for _, s in group]))
        hpos += rows * size
    n_rows = len(src)
    in_order = n_rows == len(real) == meta.num_tokens and src == list(range(n_rows))
    src_t = None if in_order else torch.tensor(src, dtype=torch.int64, device=dev)
    real_t = None if len(real) == n_rows else torch.tensor(real, dtype=torch.int64, device=dev)
    tok_t = None if in_order else (src_t if real_t is None else
                                   torch.tensor([src[p] for p in real], dtype=torch.int64, device=dev))
    is_real = set(real)
    pads_t = None if real_t is None else torch.tensor([q for q in range(n_rows) if q not in is_real],
                                                      dtype=torch.int64, device=dev)
    return Plan(ranks, n_rows, hpos, src_t, torch.tensor(slot_of, dtype=torch.int64, device=dev), real_t, tok_t,
                 pads_t)
