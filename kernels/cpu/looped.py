"""The native plan of the CPU backend: LoRA and bottleneck adapters as one call of a C loop per wrapped module
(``native.py`` builds it, ``csrc/rows.c`` holds it), on fp32 CPU tensors, for every step with a run shorter than
``LONG_RUN`` (8) tokens (decode, and decode tokens beside prefill chunks); the long runs of such a step take two
matmuls each on their row slices (``lora.py``, ``bottleneck.py``).

A call hands the loop its groups, one per working slot: int64 [slot, start, size, first token, tokens] (and for
adapters the up-bias row and activation code), and the step's active tokens sorted by slot. Both depend only on
the token layout and the pages' host tables, so they are built once per layout and kept with its strided plans
(``blocks._layout_cache``): a decode step repeats its batch's layout, and the layers of a model usually place a
step's deltas at the same rows. Nothing is gathered or padded, and only the working slots' own rows are read.
"""
from __future__ import annotations

import weakref

import torch

from ..meta import DeltaKernelMeta
from . import native
from .blocks import _layout_cache
from .gather import active_values
from .tensors import WS


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the native loops can serve a call on ``tensors`` (the pages' row tensors and the op's inputs and
    outputs): fp32 on the CPU with unit last stride, no autograd to record (the loop writes behind its back), and
    the library built here."""
    grad = torch.is_grad_enabled()  # off in the server's inference mode: no requires_grad to read
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or (t.dim() > 1 and t.stride(-1) != 1):
            return False
        if grad and t.requires_grad:
            return False
    return native.available()


LONG_RUN = 8
"""A run of this many tokens of one slot (a prefill chunk, or a hot delta's decode tokens side by side) takes two
matmuls on its row slices instead of the loop. The loop's dots are one (row, token) pair at a time, ~55 GFLOP/s
against MKL's ~150 once a cell is reused by many tokens; alone, it still beats the runs plan's two dispatches a run
up to 16-60 tokens a run (16 runs of ranks 4-64, 256 -> 704, one thread: 381 against 619 us at 16 tokens a run,
1248 against 1525 at 60, 4573 against 3835 at 190). Served, where a chunk sits beside decode tokens: bench_serving
--quick demo read 0.64-0.76 (six runs, median 0.68) with 32 here and 0.71-0.75 with 8, beside 0.71-0.78 for the
plans before the split, all within this host's noise; 8 keeps the loop to the few-token groups it is made for.
The step's other tokens still take the loop: one call, where the runs plan paid two matmul dispatches per run."""


class Split:
    """A token layout for the native plan: ``long`` runs (a, b, slot) of at least LONG_RUN tokens, and every other
    active token grouped by slot: ``seg[slot] = (first, count)`` in ``toks`` (int64)."""

    __slots__ = ("long", "seg", "toks", "toks_host")

    def __init__(self, long: list, seg: dict, toks: torch.Tensor, toks_host: list[int]):
        self.long, self.seg, self.toks, self.toks_host = long, seg, toks, toks_host


def split(meta: DeltaKernelMeta) -> Split:
    """``meta``'s layout cut for the native plan, kept per token layout (``blocks._layout_cache``)."""
    cache = _layout_cache(meta)
    hit = cache.get("split")
    if hit is None:
        sh = meta.seg_start_host
        long = [r for r in meta.runs_host if r[1] - r[0] >= LONG_RUN]
        if not long:  # decode: every token, in the step's slot order
            seg = {s: (sh[k], sh[k + 1] - sh[k]) for k, s in enumerate(meta.active_slots_host)}
            toks = meta.sorted_active_ids.contiguous()
            flat = toks.tolist()
        else:
            by_slot: dict[int, list[int]] = {}
            for a, b, s in meta.runs_host:
                if b - a < LONG_RUN:
                    by_slot.setdefault(s, []).extend(range(a, b))
            seg, flat = {}, []
            for s in meta.active_slots_host:
                ids = by_slot.get(s, ())
                seg[s] = (len(flat), len(ids))
                flat.extend(ids)
            toks = torch.tensor(flat, dtype=torch.int64)
        hit = cache["split"] = Split(long, seg, toks, flat)
    return hit


_PAGES_OK: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()


def usable_with(pages, names: tuple[str, ...], *tensors: torch.Tensor) -> bool:
    """``usable`` of the pages' tensors ``names`` and ``tensors``, the pages' verdict kept per pages object (their
    tensors never change; a layer hands the same object to every step until its storage moves): ~75 checks of 3-5
    tensors a decode step of the served mix were ~0.6 ms (CPU benchmark model)."""
    if torch.is_grad_enabled():  # requires_grad of the pages matters then: no verdict kept
        return usable(*(getattr(pages, n) for n in names), *tensors)
    ok = _PAGES_OK.get(pages)
    if ok is None:
        ok = _PAGES_OK[pages] = usable(*(getattr(pages, n) for n in names))
    return ok and usable(*tensors)


def _groups(meta: DeltaKernelMeta, work: list[int], columns: list[tuple], slots: int = 1 << 62,
            extra_rows: int = 1 << 62) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(int64 [G, 5 + extra] groups, int64 [N] tokens by slot, the most rows x tokens of one group) over the tokens of
    ``work`` slots outside the layout's long runs (``split``), kept per token layout and per ``work`` and
    ``columns`` (host values per working slot: start, size, extra fields; the runs are checked by the caller,
    ``gather.check_runs``). A slot past ``slots`` (the per-slot tables) or a first extra field past ``extra_rows``
    (the up-bias rows) is a ValueError: the loop would read outside the tensors."""
    cache = _layout_cache(meta)
    key = ("native", tuple(work), tuple(columns))
    hit = cache.get(key)
    if hit is None:
        if work and max(work) >= slots:
            raise ValueError(f"native plan: slot {max(work)} past the {slots} slots of the pages' tables")
        bad = [c[2] for c in columns if len(c) > 2 and not 0 <= c[2] < extra_rows]
        if bad:
            raise ValueError(f"native plan: up-bias row {bad[0]} outside the {extra_rows} rows of the pages")
        sp = split(meta)
        rows, most = [], 1
        for s, col in zip(work, columns):
            first, n = sp.seg[s]
            if n:
                rows.append([s, col[0], col[1], first, n, *col[2:]])
                most = max(most, n * col[1])
        width = 5 + max((len(c) - 2 for c in columns), default=0)
        hit = cache[key] = (torch.tensor(rows, dtype=torch.int64).view(-1, width), sp.toks, most)
    return hit


def native_lora(y: torch.Tensor, x: torch.Tensor, pages, ranks, starts, work: list[int],
                meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (x[t] @ A_s.T) @ B_s.T for the tokens of ``work`` slots (active, rank > 0; ``ranks``,
    ``starts`` the host values of the pages' tables) outside the layout's long runs (``split``). Shapes as
    ``kernels.add_lora``; every tensor ``usable``."""
    groups, toks, _ = _groups(meta, work, [(starts[s], ranks[s]) for s in work], pages.scale.shape[0])
    a, b, sc = pages.a_rows, pages.b_rows, pages.scale
    native.library().ds_lora_f32(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), a.data_ptr(), a.stride(0),
                                 b.data_ptr(), b.stride(0), x.shape[1], y.shape[1], sc.data_ptr(), sc.stride(0),
                                 groups.data_ptr(), groups.shape[0], toks.data_ptr())


def native_bottleneck(y: torch.Tensor, u: torch.Tensor, pages, widths, starts, acts, work: list[int],
                      meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s) for the tokens of ``work`` slots (active,
    width > 0) outside the layout's long runs (``split``); ``u`` may be ``y``. Shapes as ``kernels.add_bottleneck``;
    every tensor ``usable``."""
    ub_row = active_values(pages, "up_bias_row", meta)
    groups, toks, most = _groups(meta, work, [(starts[s], widths[s], ub_row[s], acts[s]) for s in work],
                                 pages.scale.shape[0], pages.up_bias_rows.shape[0])
    h = WS.get("nat_h", (most,), torch.float32, y.device)
    d, up, db, ub, sc = pages.down_rows, pages.up_rows, pages.down_bias, pages.up_bias_rows, pages.scale
    native.library().ds_bottleneck_f32(y.data_ptr(), y.stride(0), u.data_ptr(), u.stride(0), d.data_ptr(),
                                       d.stride(0), up.data_ptr(), up.stride(0), db.data_ptr(), db.stride(0),
                                       ub.data_ptr(), ub.stride(0), y.shape[1], sc.data_ptr(), sc.stride(0),
                                       groups.data_ptr(), groups.shape[0], toks.data_ptr(), h.data_ptr())


def _pairs(meta: DeltaKernelMeta, rows: dict | list, n_rows: int, slots: list[int]) -> torch.Tensor:
    """int64 [N, 2]: (token, its slot's row) for the tokens of the active ``slots`` outside the layout's long runs
    (``split``), kept per token layout and row values (``rows``: slot -> row, host values)."""
    cache = _layout_cache(meta)
    key = ("pairs", tuple(slots), tuple([rows[s] for s in slots]))
    hit = cache.get(key)
    if hit is None:
        bad = [rows[s] for s in slots if not 0 <= rows[s] < n_rows]
        if bad:
            raise ValueError(f"native plan: row {bad[0]} outside the {n_rows} rows of the pages")
        sp = split(meta)
        flat, seg = sp.toks_host, sp.seg
        pairs = [(t, rows[s]) for s in slots for t in flat[seg[s][0]:seg[s][0] + seg[s][1]]]
        hit = cache[key] = torch.tensor(pairs, dtype=torch.int64).view(-1, 2)
    return hit


def native_rows(t: torch.Tensor, pages, meta: DeltaKernelMeta, op: int) -> None:
    """t[i] += rows[row[slot[i]]] (op 0, ``kernels.add_bias``) or t[i] *= ... (op 1, ``kernels.mul_rows``) for the
    active tokens: the layout's long runs (``split``) a slice op each, the others in the loop; every tensor
    ``usable``."""
    rows, row = pages.rows, active_values(pages, "row", meta)
    for a, b, s in split(meta).long:  # prefill chunks beside the decode tokens: one slice op each
        (t[a:b].add_ if op == 0 else t[a:b].mul_)(rows[row[s]])
    pairs = _pairs(meta, row, rows.shape[0], meta.active_slots_host)
    native.library().ds_rows_f32(t.data_ptr(), t.stride(0), rows.data_ptr(), rows.stride(0), t.shape[1],
                                 pairs.data_ptr(), pairs.shape[0], op)


def native_affine(y: torch.Tensor, pages, meta: DeltaKernelMeta, rows: list[int], flagged: list[int]) -> None:
    """y[t] = y[t] * scale_rows[row] + shift_rows[row] for the tokens of the ``flagged`` active slots (``rows`` their
    host row values; ``kernels.scale_shift_rows``, DoRA): the layout's long runs (``split``) an ``addcmul`` each, the
    others in the loop; every tensor ``usable``."""
    g, c = pages.scale_rows, pages.shift_rows
    on = set(flagged)
    for a, b, s in split(meta).long:  # prefill chunks beside the decode tokens: one fused op each
        if s in on:
            torch.addcmul(c[rows[s]], y[a:b], g[rows[s]], out=y[a:b])
    pairs = _pairs(meta, rows, min(g.shape[0], c.shape[0]), flagged)
    native.library().ds_affine_f32(y.data_ptr(), y.stride(0), g.data_ptr(), g.stride(0), c.data_ptr(), c.stride(0),
                                   y.shape[1], pairs.data_ptr(), pairs.shape[0])
