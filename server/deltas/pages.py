"""Row arenas: where one wrapped layer keeps its resident deltas' weights, paged by real size (D13).

An arena is one row tensor ``rows [capacity, width]`` (allocated on the first term, grown and shrunk by
whole relayouts, never zero-filled) cut into *regions*, one per rank bucket. Region ``b`` is an array of
equal *cells* of ``b`` consecutive rows; a term of ``n`` rows (a LoRA of rank n, an adapter of width n, or
n = 1 for a BitFit / (IA)3 vector) takes one cell of the smallest bucket >= n::

    rows:  | region 4: cell 0 | cell 1 | (free) | region 16: cell 0 | (free) | cell 2 | region 64: ... |
    a term's first row = region.start + cell.index * bucket          (what kernels.LoraPages.start holds)

Buckets are 1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 32, 40, 51, 64, 81, 102, 128, 152, 181, 215, 256, ...: the
powers of two and the fewest steps between them such that a term holds at most 1.25x its real rows (a rank-5
LoRA holds 6), and exactly its real rows at the usual ranks 4, 8, 16, 32, 64, 128 and 256. Compute never pays the bucket: kernels read each slot's real rank (D3).

Why regions: the ops read a slot's run through one int32 index whatever the layout, but the CPU backend's
fastest plan reads runs of one rank as a strided ``[G, rank, width]`` view, which needs them evenly spaced;
cells of one region are (``kernels/cpu/grouped.py``). Why one tensor per arena: one launch per op on a GPU.

Nothing here decides budgets: ``grow`` takes the bytes it may add, ``compact`` gives free cells back, and
the residency owner (``server/deltas/residency.py``) calls both, on the step loop, between forwards. A
relayout moves cells (their ``index`` changes and the region starts move), bumps ``version`` and the layer
rewrites its per-slot row indices from its cells.
"""
from __future__ import annotations

import bisect
import heapq
import math

import torch


MAX_WASTE = 1.25
"""A term of n rows sits in a cell of at most this many times n rows."""


def _ladder(top: int = 1 << 16) -> tuple[int, ...]:
    """Bucket sizes: 1, 2, 3, 4, then every power of two with the fewest geometric steps between consecutive
    powers such that any n lands in a bucket b with n <= b <= MAX_WASTE * n (checked in the tests)."""
    out = [1, 2, 3, 4]
    p = 4
    while p < top:
        for k in range(1, 16):
            steps = [round(p * 2 ** (i / k)) for i in range(1, k)] + [2 * p]
            prev, ok = p, True
            for b in steps:
                ok &= b > prev and b <= MAX_WASTE * (prev + 1)
                prev = b
            if ok:
                out += steps
                break
        p *= 2
    return tuple(out)


BUCKETS = _ladder()


def bucket_rows(n: int) -> int:
    """Rows of the cell a term of ``n`` rows takes."""
    if n < 1 or n > BUCKETS[-1]:
        raise ValueError(f"bucket_rows: {n} rows outside [1, {BUCKETS[-1]}]")
    return BUCKETS[bisect.bisect_left(BUCKETS, n)]


GROWTH = 2.0
"""A full region grows to this many times its cells (as the budget allows), so loading many deltas relayouts
an arena O(log n) times; free cells cost nothing until a budget needs them back (``compact``)."""
MIN_GROWTH_FRACTION = 0.125
"""...and by at least this fraction of the arena's rows, so a small region growing in a large arena does not
relayout the large arena once per cell."""


class Cell:
    """A place in an arena: cell ``index`` of the region of ``bucket`` rows, ``rows`` of them used."""

    __slots__ = ("bucket", "index", "rows")

    def __init__(self, bucket: int, index: int, rows: int):
        self.bucket, self.index, self.rows = bucket, index, rows


class _Region:
    __slots__ = ("bucket", "start", "cells", "free")

    def __init__(self, bucket: int, start: int, capacity: int):
        self.bucket = bucket
        self.start = start  # first row
        self.cells: list[Cell | None] = [None] * capacity
        self.free = list(range(capacity))  # a heap: the lowest free cell first keeps live cells packed

    @property
    def capacity(self) -> int:
        return len(self.cells)

    @property
    def live(self) -> int:
        return len(self.cells) - len(self.free)


class NoRoom(Exception):
    """``grow`` would need more bytes than it was given."""


class RowArena:
    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str):
        if width < 1:
            raise ValueError(f"RowArena: width must be >= 1, got {width}")
        self.width = int(width)
        self.dtype = dtype
        self.device = torch.device(device)
        self.rows: torch.Tensor | None = None  # [capacity_rows, width]; None until the first term
        self.regions: dict[int, _Region] = {}  # bucket -> region, laid out in bucket order
        self.version = 0  # bumped by every relayout: row indices read before it are stale
        self.row_bytes = self.width * torch.empty(0, dtype=dtype).element_size()

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def capacity_rows(self) -> int:
        return sum(r.capacity * r.bucket for r in self.regions.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the row tensor (live cells, free cells and all)."""
        return 0 if self.rows is None else self.rows.shape[0] * self.row_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of the live cells."""
        return sum(r.live * r.bucket for r in self.regions.values()) * self.row_bytes

    def cell_bytes(self, n: int) -> int:
        """Bytes a term of ``n`` rows holds here."""
        return bucket_rows(n) * self.row_bytes

    def growth_rows(self, sizes: list[int]) -> int:
        """Rows the arena must add before cells for terms of ``sizes`` rows can all be allocated."""
        need: dict[int, int] = {}
        for n in sizes:
            b = bucket_rows(n)
            need[b] = need.get(b, 0) + 1
        return sum(max(0, k - len(self.regions[b].free) if b in self.regions else k) * b for b, k in need.items())

    # ---- cells ---------------------------------------------------------------------------------
    def start(self, cell: Cell) -> int:
        """First row of ``cell``."""
        return self.regions[cell.bucket].start + cell.index * cell.bucket

    def alloc(self, n: int) -> Cell | None:
        """A free cell for a term of ``n`` rows (the lowest one), or None when its region is full."""
        region = self.regions.get(bucket_rows(n))
        if region is None or not region.free:
            return None
        cell = Cell(region.bucket, heapq.heappop(region.free), n)
        region.cells[cell.index] = cell
        return cell

    def free(self, cell: Cell) -> None:
        """Give a cell back; its rows keep whatever they hold (they are never read again)."""
        region = self.regions[cell.bucket]
        if region.cells[cell.index] is not cell:
            raise ValueError(f"RowArena.free: cell {cell.index} of region {cell.bucket} is not allocated")
        region.cells[cell.index] = None
        heapq.heappush(region.free, cell.index)

    def write(self, cell: Cell, values: torch.Tensor) -> None:
        """Copy ``values`` [n, k <= width] into the cell's first n rows (``non_blocking`` from pinned memory)."""
        a = self.start(cell)
        self.rows[a:a + values.shape[0], :values.shape[1]].copy_(values, non_blocking=True)

    # ---- layout --------------------------------------------------------------------------------
    def grow(self, sizes: list[int], room_bytes: int) -> int:
        """Relayout so that cells for terms of ``sizes`` rows can be allocated, adding at most ``room_bytes``;
        full regions grow by GROWTH (and MIN_GROWTH_FRACTION of the arena) as the room allows. Returns the
        bytes added; NoRoom if even the exact growth does not fit."""
        need: dict[int, int] = {}
        for n in sizes:
            b = bucket_rows(n)
            need[b] = need.get(b, 0) + 1
        short = {b: k - (len(self.regions[b].free) if b in self.regions else 0) for b, k in need.items()}
        short = {b: k for b, k in short.items() if k > 0}
        if not short:
            return 0
        caps = {b: r.capacity for b, r in self.regions.items()}
        exact = {b: caps.get(b, 0) + k for b, k in short.items()}
        exact_rows = sum((exact[b] - caps.get(b, 0)) * b for b in short)
        if exact_rows * self.row_bytes > room_bytes:
            raise NoRoom(f"arena of width {self.width}: {exact_rows} more rows need "
                         f"{exact_rows * self.row_bytes} bytes, {room_bytes} left")
        spare_rows = room_bytes // self.row_bytes - exact_rows
        floor_rows = math.ceil(MIN_GROWTH_FRACTION * (self.capacity_rows + exact_rows))
        for b in sorted(short):
            want = max(math.ceil(GROWTH * caps.get(b, 0)), exact[b], exact[b] + -(-floor_rows // b))
            extra = min(want - exact[b], max(0, spare_rows) // b)
            exact[b] += extra
            spare_rows -= extra * b
        before = self.nbytes
        self._relayout({**caps, **exact})
        return self.nbytes - before

    def compact(self) -> int:
        """Relayout to exactly the live cells (regions without any dropped); returns the bytes given back."""
        before = self.nbytes
        caps = {b: r.live for b, r in self.regions.items() if r.live}
        if sum(c * b for b, c in caps.items()) != self.capacity_rows or len(caps) != len(self.regions):
            self._relayout(caps)
        return before - self.nbytes

    def _relayout(self, caps: dict[int, int]) -> None:
        """A new row tensor with region ``b`` holding ``caps[b]`` cells, live cells moved down in index order."""
        total = sum(c * b for b, c in caps.items())
        new = torch.empty((total, self.width), dtype=self.dtype, device=self.device) if total else None
        regions: dict[int, _Region] = {}
        row = 0
        for b in sorted(caps):
            region = _Region(b, row, caps[b])
            old = self.regions.get(b)
            if old is not None:
                live = [c for c in old.cells if c is not None]
                if len(live) > caps[b]:
                    raise AssertionError(f"relayout would drop live cells of region {b}")
                runs: list[tuple[int, int, int]] = []  # (old index, new index, cells) of consecutive cells
                for j, cell in enumerate(live):
                    if runs and runs[-1][0] + runs[-1][2] == cell.index and runs[-1][1] + runs[-1][2] == j:
                        runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
                    else:
                        runs.append((cell.index, j, 1))
                    region.cells[j] = cell
                for i, j, k in runs:
                    a = old.start + i * b
                    new[row + j * b:row + (j + k) * b].copy_(self.rows[a:a + k * b])
                for j, cell in enumerate(live):
                    cell.index = j
                region.free = list(range(len(live), caps[b]))
            regions[b] = region
            row += caps[b] * b
        self.rows, self.regions = new, regions
        self.version += 1
