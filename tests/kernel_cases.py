"""Cases for the kernel tests and ``benchmarks/bench_kernels.py``: slot maps from popularity patterns, dense
per-slot pools whose padding holds garbage (what the exact reference, ``kernels/reference.py``, reads), and
the same weights laid out as pages (``kernels.LoraPages`` ...) the way the ops read them: runs of rows placed
packed, scattered out of slot order with gaps, or in rank-bucket regions with holes left by load/evict
churn, every row no run owns filled with GARBAGE or NaN."""
from __future__ import annotations

from contextlib import contextmanager

import torch

import kernels
from kernels import AdapterPages, LoraPages, PackedLoraPages, RowPages, ScaleShiftPages, TokenPages
from tests.helpers import popularity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the Triton cases run: CUDA when present, else the CPU under TRITON_INTERPRET=1."""
BACKENDS = ("cpu", "triton")
RANKS = (1, 4, 8, 16, 64)
PATTERNS = ("identical", "distinct", "uniform", "zipf", "skewed")
ACT_NAMES = ("relu", "gelu", "gelu_new", "silu")
GARBAGE = 1e3
"""Written into pool padding (past a slot's rank or width): a kernel that reads past it fails loudly."""
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
"""fp32 op against the float64 reference at the test sizes (in, out <= 72, ranks <= 64)."""


@contextmanager
def on(backend: str):
    """Run the public ops (``kernels.add_lora`` ...) on ``backend`` inside the block."""
    with kernels.backend(backend):
        yield


def slot_ids(num_tokens: int, num_deltas: int, kind: str, *, pool_slots: int | None = None, seed: int = 0,
             none_fraction: float = 0.0) -> list[int]:
    """Per-token slot ids (-1 = none): ``popularity`` indices mapped onto a random subset of the
    ``pool_slots`` slot ids, so active slots are neither 0..n-1 nor contiguous."""
    pool_slots = pool_slots or num_deltas + 2
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randperm(pool_slots, generator=g)[:num_deltas].tolist()
    return [-1 if k < 0 else ids[k] for k in popularity(num_tokens, num_deltas, kind, seed=seed,
                                                        none_fraction=none_fraction)]


def slots_tensor(slots: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int32, device=device)


def _pad_garbage(pool: torch.Tensor, sizes: list[int], dim: int) -> None:
    for s, n in enumerate(sizes):
        pool[s].narrow(dim - 1, n, pool.shape[dim] - n).fill_(GARBAGE)


def lora_pools(num_slots: int, n_in: int, n_out: int, ranks: list[int], *, max_rank: int = 64,
               dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Dense: lora_a [S, R, in], lora_b [S, out, R], scale fp32 [S], rank int32 [S]; padding holds GARBAGE."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_slots, max_rank, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(num_slots, n_out, max_rank, generator=g) / 4
    _pad_garbage(a, ranks, 1)
    _pad_garbage(b, ranks, 2)
    return dict(lora_a=a.to(device, dtype), lora_b=b.to(device, dtype),
                scale=(0.5 + torch.rand(num_slots, generator=g)).to(device),
                rank=torch.tensor(ranks, dtype=torch.int32, device=device))


def bottleneck_pools(num_slots: int, hidden: int, widths: list[int], acts: list[int], *, max_width: int = 32,
                     dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """down [S, M, h], down_bias [S, M], up [S, h, M], up_bias [S, h], scale, width, act; padding = GARBAGE."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(num_slots, max_width, hidden, generator=g) / hidden ** 0.5
    down_bias = torch.randn(num_slots, max_width, generator=g) / 4
    up = torch.randn(num_slots, hidden, max_width, generator=g) / 4
    up_bias = torch.randn(num_slots, hidden, generator=g) / 4
    _pad_garbage(down, widths, 1)
    _pad_garbage(down_bias, widths, 1)
    _pad_garbage(up, widths, 2)
    return dict(down=down.to(device, dtype), down_bias=down_bias.to(device, dtype), up=up.to(device, dtype),
                up_bias=up_bias.to(device, dtype), scale=(0.5 + torch.rand(num_slots, generator=g)).to(device),
                width=torch.tensor(widths, dtype=torch.int32, device=device),
                act=torch.tensor(acts, dtype=torch.int32, device=device))


# ------------------------------------------------------------------------------------------- pages
LAYOUTS = ("packed", "scattered", "regions", "reversed")
"""packed: runs back to back in slot order (the old pools' order); scattered: a random order with gaps of 0-3
rows; regions: runs of one rank bucket as equal cells of a region, cells taken at random with free cells left
between (a fragmented arena); reversed: runs in descending slot order."""
BUCKET_LADDER = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 51, 64, 81, 102, 128, 152, 181, 215, 256)


def _bucket(n: int) -> int:
    return next(b for b in BUCKET_LADDER if b >= n)


def place(sizes: list[int], layout: str, seed: int = 0) -> tuple[list[int], int]:
    """(start row per slot, rows needed) for runs of ``sizes`` rows; a size-0 slot gets a start too (never read)."""
    g = torch.Generator().manual_seed(seed + 11)
    n = len(sizes)
    starts = [0] * n
    if layout in ("packed", "reversed", "scattered"):
        order = list(range(n))
        if layout == "reversed":
            order.reverse()
        elif layout == "scattered":
            order = torch.randperm(n, generator=g).tolist()
        row = 0
        for s in order:
            if layout == "scattered":
                row += int(torch.randint(0, 4, (1,), generator=g))
            starts[s] = row
            row += sizes[s]
        return starts, max(row, 1)
    if layout != "regions":
        raise ValueError(f"unknown layout {layout!r}")
    by_bucket: dict[int, list[int]] = {}
    for s, k in enumerate(sizes):
        by_bucket.setdefault(_bucket(max(k, 1)), []).append(s)
    row = 0
    for b, members in sorted(by_bucket.items()):
        cells = len(members) + 1 + len(members) // 2  # free cells left by evictions
        picks = torch.randperm(cells, generator=g)[:len(members)].tolist()
        for s, c in zip(members, picks):
            starts[s] = row + c * b
        row += cells * b
    return starts, row


def _aligned(n: int, dtype) -> int:
    a = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    return -(-n // a) * a


def _table(num_rows: int, width: int, fill: float, dtype, device) -> torch.Tensor:
    return torch.full((num_rows, width), fill, dtype=dtype, device=device)


def lora_pages(pools: dict, *, layout: str = "scattered", seed: int = 0, fill: float = GARBAGE,
               at: tuple[list[int], int] | None = None) -> LoraPages:
    """The LoRA of dense ``pools`` (``lora_pools``) as pages: A and B rows of each slot's rank side by side in
    one row tensor (a_rows and b_rows its two column ranges), runs placed by ``layout`` (or ``at``: the start row
    of each slot and the rows of the tensor)."""
    a, b = pools["lora_a"], pools["lora_b"]  # [S, R, in], [S, out, R]
    ranks = pools["rank"].tolist()
    n_in, n_out = a.shape[2], b.shape[1]
    starts, num_rows = place(ranks, layout, seed) if at is None else at
    w_in = _aligned(n_in, a.dtype)
    table = _table(num_rows, w_in + _aligned(n_out, a.dtype), fill, a.dtype, a.device)
    for s, r in enumerate(ranks):
        table[starts[s]:starts[s] + r, :n_in] = a[s, :r]
        table[starts[s]:starts[s] + r, w_in:w_in + n_out] = b[s, :, :r].t()
    dev = a.device
    return LoraPages(table[:, :n_in], table[:, w_in:w_in + n_out], torch.tensor(starts, dtype=torch.int32, device=dev),
                     pools["rank"], pools["scale"], max(ranks, default=0))


def packed_lora_pages(member_pools: list[dict], *, layout: str = "scattered", seed: int = 0,
                      fill: float = GARBAGE) -> tuple[PackedLoraPages, list[tuple]]:
    """Sibling LoRAs (one ``lora_pools`` dict per member, same slots and ``in``, any ``out`` and ranks) as packed
    pages: each slot's stack holds its members' A rows in member order (rank-0 members take none), placed by
    ``layout`` in one A table; each member's B rows at the same row indices of its own table. Returns the pages
    and, per member, the dense reference arguments (stack_a [S, R, in], offset [S], lora_b, scale, rank)."""
    a0 = member_pools[0]["lora_a"]
    num_slots, n_in, dt, dev = a0.shape[0], a0.shape[2], a0.dtype, a0.device
    ranks = [[int(r) for r in mp["rank"].tolist()] for mp in member_pools]
    totals = [sum(r[s] for r in ranks) for s in range(num_slots)]
    starts, num_rows = place(totals, layout, seed)
    a_tab = _table(num_rows, _aligned(n_in, dt), fill, dt, dev)
    top = max(totals + [1])
    stack_a = torch.full((num_slots, top, n_in), GARBAGE, dtype=dt, device=dev)
    members, dense = [], []
    offsets = [0] * num_slots
    for m, mp in enumerate(member_pools):
        n_out = mp["lora_b"].shape[1]
        b_tab = _table(num_rows, _aligned(n_out, dt), fill, dt, dev)
        m_start, m_off = [], []
        for s in range(num_slots):
            r, row = ranks[m][s], starts[s] + offsets[s]
            a_tab[row:row + r, :n_in] = mp["lora_a"][s, :r]
            b_tab[row:row + r, :n_out] = mp["lora_b"][s, :, :r].t()
            stack_a[s, offsets[s]:offsets[s] + r] = mp["lora_a"][s, :r]
            m_start.append(row)
            m_off.append(offsets[s])
            offsets[s] += r
        members.append(LoraPages(a_tab[:, :n_in], b_tab[:, :n_out],
                                 torch.tensor(m_start, dtype=torch.int32, device=dev), mp["rank"], mp["scale"],
                                 max(ranks[m], default=0)))
        dense.append((stack_a, m_off, mp["lora_b"], mp["scale"], mp["rank"]))
    pages = PackedLoraPages(a_tab[:, :n_in], torch.tensor(starts, dtype=torch.int32, device=dev),
                            torch.tensor(totals, dtype=torch.int32, device=dev), max(totals, default=0), tuple(members))
    return pages, dense


def adapter_pages(pools: dict, *, layout: str = "scattered", seed: int = 0, fill: float = GARBAGE,
                  at: tuple[list[int], int] | None = None) -> AdapterPages:
    """The adapters of dense ``pools`` (``bottleneck_pools``) as pages: down, up and the down bias of each slot's
    width in one row tensor; the up biases one row each in another, scattered. ``at`` as for ``lora_pages``."""
    down, up = pools["down"], pools["up"]  # [S, M, h], [S, h, M]
    widths = pools["width"].tolist()
    num_slots, hidden = down.shape[0], down.shape[2]
    starts, num_rows = place(widths, layout, seed) if at is None else at
    w = _aligned(hidden, down.dtype)
    table = _table(num_rows, 2 * w + _aligned(1, down.dtype), fill, down.dtype, down.device)
    for s, m in enumerate(widths):
        table[starts[s]:starts[s] + m, :hidden] = down[s, :m]
        table[starts[s]:starts[s] + m, w:w + hidden] = up[s, :, :m].t()
        table[starts[s]:starts[s] + m, 2 * w] = pools["down_bias"][s, :m]
    ub = row_pages(pools["up_bias"], layout="scattered", seed=seed + 1, fill=fill)
    dev = down.device
    return AdapterPages(table[:, :hidden], table[:, w:w + hidden], table[:, 2 * w],
                        ub.rows, torch.tensor(starts, dtype=torch.int32, device=dev), ub.row, pools["width"],
                        pools["scale"], pools["act"], max(widths, default=0))


def row_pages(vec: torch.Tensor, *, layout: str = "scattered", seed: int = 0, fill: float = GARBAGE) -> RowPages:
    """One row per slot of ``vec`` [S, n], placed by ``layout`` among rows holding ``fill``."""
    starts, num_rows = place([1] * vec.shape[0], layout, seed)
    table = _table(num_rows, _aligned(vec.shape[1], vec.dtype), fill, vec.dtype, vec.device)
    for s in range(vec.shape[0]):
        table[starts[s], :vec.shape[1]] = vec[s]
    return RowPages(table[:, :vec.shape[1]], torch.tensor(starts, dtype=torch.int32, device=vec.device))


def dense_lora(pages: LoraPages, max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages back to dense per-slot pools for the exact reference: lora_a [S, R, in], lora_b [S, out, R]
    (R = max rank; rows past a slot's rank are GARBAGE, which the reference never reads)."""
    ranks, starts = pages.rank.tolist(), pages.start.tolist()
    top = max_rank or max(ranks + [1])
    num_slots, n_in, n_out = len(ranks), pages.a_rows.shape[1], pages.b_rows.shape[1]
    a = torch.full((num_slots, top, n_in), GARBAGE, dtype=pages.a_rows.dtype, device=pages.a_rows.device)
    b = torch.full((num_slots, n_out, top), GARBAGE, dtype=pages.b_rows.dtype, device=pages.b_rows.device)
    for s, (r, st) in enumerate(zip(ranks, starts)):
        if r:
            a[s, :r] = pages.a_rows[st:st + r]
            b[s, :, :r] = pages.b_rows[st:st + r].t()
    return a, b


def dense_rows(pages: RowPages) -> torch.Tensor:
    """[S, n]: each slot's row, for ref_add_bias / ref_mul_rows."""
    return pages.rows.index_select(0, pages.row.long())


def dense_bottleneck(pages: AdapterPages) -> dict:
    """Pages back to the dense pools ``ref_add_bottleneck`` reads (the inverse of ``adapter_pages``)."""
    widths, starts = pages.width.tolist(), pages.start.tolist()
    top = max(widths + [1])
    num_slots, hidden = len(widths), pages.down_rows.shape[1]
    kw = dict(dtype=pages.down_rows.dtype, device=pages.down_rows.device)
    down = torch.full((num_slots, top, hidden), GARBAGE, **kw)
    down_bias = torch.full((num_slots, top), GARBAGE, **kw)
    up = torch.full((num_slots, hidden, top), GARBAGE, **kw)
    for s, (m, st) in enumerate(zip(widths, starts)):
        if m:
            down[s, :m] = pages.down_rows[st:st + m]
            down_bias[s, :m] = pages.down_bias[st:st + m]
            up[s, :, :m] = pages.up_rows[st:st + m].t()
    up_bias = pages.up_bias_rows.index_select(0, pages.up_bias_row.long())
    return dict(down=down, down_bias=down_bias, up=up, up_bias=up_bias, scale=pages.scale, width=pages.width,
                act=pages.act)


def scale_shift_pages(scale: torch.Tensor, shift: torch.Tensor, flag: torch.Tensor, *, layout: str = "scattered",
                      seed: int = 0, fill: float = GARBAGE) -> ScaleShiftPages:
    """DoRA's dense [S, n] scale and shift as pages: each flagged slot's two rows side by side in one fp32 row
    tensor, placed by ``layout``; unflagged slots point at a row of ``fill`` (never read)."""
    num_slots, n = scale.shape
    starts, num_rows = place([1] * num_slots, layout, seed)
    w = _aligned(n, scale.dtype)
    table = _table(num_rows, 2 * w, fill, scale.dtype, scale.device)
    for s in range(num_slots):
        if int(flag[s]):
            table[starts[s], :n], table[starts[s], w:w + n] = scale[s], shift[s]
    return ScaleShiftPages(table[:, :n], table[:, w:w + n], torch.tensor(starts, dtype=torch.int32,
                                                                         device=scale.device), flag)


def token_pages(index: torch.Tensor, values: torch.Tensor, count: torch.Tensor, *, layout: str = "scattered",
                seed: int = 0, fill: float = GARBAGE) -> TokenPages:
    """Dense trainable-token pools (index int64 [S, R], values [S, R, h], count [S]) as pages: each slot's
    ``count`` rows a run of one value tensor, its ids a run of an int64 tensor placed independently."""
    counts = count.tolist()
    hidden = values.shape[2]
    starts, num_rows = place(counts, layout, seed)
    id_starts, num_ids = place(counts, "scattered" if layout != "scattered" else "reversed", seed + 5)
    table = _table(num_rows, _aligned(hidden, values.dtype), fill, values.dtype, values.device)
    ids = torch.full((num_ids, 2), -7, dtype=torch.int64, device=index.device)  # a strided column of it
    for s, c in enumerate(counts):
        table[starts[s]:starts[s] + c, :hidden] = values[s, :c]
        ids[id_starts[s]:id_starts[s] + c, 0] = index[s, :c]
    dev = index.device
    return TokenPages(table[:, :hidden], ids[:, 0], torch.tensor(starts, dtype=torch.int32, device=dev),
                      torch.tensor(id_starts, dtype=torch.int32, device=dev), count, max(counts, default=0))


def mixed_rank_lora_case(pattern: str, layout: str) -> tuple:
    """(slots, x, y, pages, expected) of the CPU plans' shared LoRA case: 40 resident slots of ranks 1-64, 14
    active, a quarter of the tokens on the base model; in = 37, out = 23 (grouped_mm would refuse these widths);
    NaN in every row no run owns; ``expected`` the exact reference."""
    from kernels.reference import ref_add_lora

    ranks = [1 + (11 * s) % 64 for s in range(40)]
    pools = lora_pools(40, 37, 23, ranks, seed=3)
    slots = slot_ids(29, 14, pattern, pool_slots=40, seed=4, none_fraction=0.25)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(29, 37, generator=g), torch.randn(29, 23, generator=g)
    pages = lora_pages(pools, layout=layout, seed=6, fill=float("nan"))
    expected = ref_add_lora(y, x, *[pools[k] for k in ("lora_a", "lora_b", "scale", "rank")], slots)
    return slots, x, y, pages, expected
