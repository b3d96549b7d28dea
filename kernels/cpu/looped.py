"""The native plan of the CPU backend: LoRA, bottleneck adapters, BitFit / (IA)3 rows and DoRA's column scale as one
call of a C loop per wrapped module (``native.py`` builds it, ``csrc/rows.c`` holds it), on fp32 CPU tensors, for
every step with a run shorter than ``LONG_RUN`` (8) tokens (decode, and decode tokens beside prefill chunks); the
long runs of such a step take two matmuls each on their row slices (``lora.py``, ``bottleneck.py``).

A call hands the loop the pages' tensors and per-slot tables (the loop reads each slot's rank, first row and scale
itself, as the Triton kernels do, and checks them before it writes) and the step's *segments*: int64 [slot, first,
tokens] per active slot, over the active tokens sorted by slot. Those depend only on the token layout, so they are
built once per layout (``split``, kept with the strided plans in ``blocks._layout_cache``) and serve every wrapped
module and every term of the step. What is left per call is a few attribute reads: the pages' pointers and sizes
are kept per pages object (``_args``; a layer hands the same object to every step until its storage moves).
Measured before, when each call built its groups from the host tables: 40-60 us of Python a wrapped module per
decode step of 32 deltas, ~5 ms of the demo model's ~8 ms of delta work.
"""
from __future__ import annotations

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
    active token grouped by slot: ``seg[slot] = (first, count)`` in ``toks`` (int64), and the same as ``segs`` int64
    [A, 3] (slot, first, count) over the slots with a count, what the loops walk (``args``: its pointers)."""

    __slots__ = ("long", "seg", "toks", "toks_host", "segs", "most", "args")

    def __init__(self, long: list, seg: dict, toks: torch.Tensor, toks_host: list[int]):
        self.long, self.seg, self.toks, self.toks_host = long, seg, toks, toks_host
        rows = [(s, first, n) for s, (first, n) in seg.items() if n]
        self.segs = torch.tensor(rows, dtype=torch.int64).view(-1, 3)  # [A, 3]
        self.most = max((n for _, _, n in rows), default=0)  # the most tokens of one segment
        self.args = (self.segs.data_ptr(), len(rows), toks.data_ptr())


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


def usable_with(pages, names: tuple[str, ...], *tensors: torch.Tensor) -> bool:
    """``usable`` of the pages' tensors ``names`` and ``tensors``, the pages' verdict kept in their memo
    (``kernels.pages.MEMO``; a layer hands the same object to every step until its storage moves): ~75 checks of 3-5
    tensors a decode step of the served mix were ~0.6 ms (CPU benchmark model)."""
    if torch.is_grad_enabled():  # requires_grad of the pages matters then: no verdict kept
        return usable(*(getattr(pages, n) for n in names), *tensors)
    ok = pages.memo.get(usable_with)
    if ok is None:
        ok = pages.memo[usable_with] = usable(*(getattr(pages, n) for n in names))
    return ok and usable(*tensors)


def _args(pages, build) -> tuple:
    """``build(pages)``: the loop's arguments that come from the pages (pointers, row strides, sizes), kept in the
    pages' memo (``kernels.pages.MEMO``): its tensors never change, and the tables it points at are read by the loop
    at each call."""
    hit = pages.memo.get(build)
    if hit is None:
        hit = pages.memo[build] = build(pages)
    return hit


def _ptrs(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _why(op: str, pages, slot: int) -> str:
    """What the loop found wrong with ``slot`` in ``pages`` (only asked once it refused)."""
    if op == "add_lora":
        n, slots = pages.a_rows.shape[0], pages.rank.shape[0]
        if slot >= slots:
            return f"past the {slots} slots of the pages"
        return f"rank {int(pages.rank[slot])} from row {int(pages.start[slot])} outside the {n} rows of the pages"
    if op == "add_bottleneck":
        if slot >= pages.width.shape[0]:
            return f"past the {pages.width.shape[0]} slots of the pages"
        w, st = int(pages.width[slot]), int(pages.start[slot])
        ub, act = int(pages.up_bias_row[slot]), int(pages.act[slot])
        if not 0 <= act <= 3:
            return f"act[{slot}] = {act} is not an activation code (0..3)"
        if not 0 <= ub < pages.up_bias_rows.shape[0]:
            return f"up-bias row {ub} outside the {pages.up_bias_rows.shape[0]} up-bias rows of the pages"
        if st < 0 or st + w > pages.down_rows.shape[0]:
            return f"width {w} from row {st} leaves the {pages.down_rows.shape[0]} rows of the pages"
        return f"width {w} past the pages' max_width {pages.max_width}"
    if op == "scale_shift_rows":
        return f"row outside the {pages.scale_rows.shape[0]} rows or the {pages.flag.shape[0]} slots of the pages"
    return f"row outside the {pages.rows.shape[0]} rows or the {pages.row.shape[0]} slots of the pages"


def raise_failed(bad: int, op: str, pages, meta: DeltaKernelMeta) -> None:
    """A loop's return value: 0 is success; ``k + 1`` says it refused segment k of ``meta``'s layout before it wrote
    anything (a ValueError naming the slot)."""
    if bad:
        slot = int(split(meta).segs[bad - 1, 0])
        raise ValueError(f"{op}: slot {slot}: {_why(op, pages, slot)} (native plan; nothing was written)")


def _lora_args(p) -> tuple:
    a, b = p.a_rows, p.b_rows
    return (a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), a.shape[1], b.shape[1],
            *_ptrs(p.start, p.rank, p.scale), p.rank.shape[0], a.shape[0])


def native_lora(y: torch.Tensor, x: torch.Tensor, pages, meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (x[t] @ A_s.T) @ B_s.T for the active tokens outside the layout's long runs (``split``);
    slots with rank 0 are skipped by the loop. Shapes as ``kernels.add_lora``; every tensor ``usable``."""
    raise_failed(native.library().ds_lora_f32(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0),
                                              *lora_args(pages), *split(meta).args), "add_lora", pages, meta)


def lora_args(pages) -> tuple:
    """``ds_lora_f32``'s arguments from ``pages`` (kept per pages object)."""
    return _args(pages, _lora_args)


def _bottleneck_args(p) -> tuple:
    d, up, db, ub = p.down_rows, p.up_rows, p.down_bias, p.up_bias_rows
    return (d.data_ptr(), d.stride(0), up.data_ptr(), up.stride(0), db.data_ptr(), db.stride(0) if db.dim() else 0,
            ub.data_ptr(), ub.stride(0), d.shape[1], *_ptrs(p.start, p.width, p.scale, p.up_bias_row, p.act),
            p.width.shape[0], d.shape[0], ub.shape[0])


def native_bottleneck(y: torch.Tensor, u: torch.Tensor, pages, meta: DeltaKernelMeta) -> None:
    """y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s) for the active tokens outside the layout's long
    runs (``split``); slots with width 0 are skipped by the loop; ``u`` may be ``y``. Shapes as
    ``kernels.add_bottleneck``; every tensor ``usable``."""
    sp = split(meta)
    cap = max(1, sp.most * pages.max_width)
    h = WS.get("nat_h", (cap,), torch.float32, y.device)
    bad = native.library().ds_bottleneck_f32(y.data_ptr(), y.stride(0), u.data_ptr(), u.stride(0),
                                             *_args(pages, _bottleneck_args), *sp.args, h.data_ptr(), cap)
    raise_failed(bad, "add_bottleneck", pages, meta)


def _rows_args(p) -> tuple:
    return (p.rows.data_ptr(), p.rows.stride(0), p.rows.shape[1], p.row.data_ptr(), p.row.shape[0], p.rows.shape[0],
            p.neutral)


def native_rows(t: torch.Tensor, pages, meta: DeltaKernelMeta, op: int) -> None:
    """t[i] += rows[row[slot[i]]] (op 0, ``kernels.add_bias``) or t[i] *= ... (op 1, ``kernels.mul_rows``) for the
    active tokens whose row is not the pages' ``neutral`` one: the layout's long runs (``split``) a slice op each, the
    others in the loop; every tensor ``usable``."""
    rows_long(t, pages, meta, op)
    raise_failed(native.library().ds_rows_f32(t.data_ptr(), t.stride(0), *rows_args(pages), *split(meta).args, op),
                 "add_bias" if op == 0 else "mul_rows", pages, meta)


def rows_long(t: torch.Tensor, pages, meta: DeltaKernelMeta, op: int) -> None:
    """``native_rows``' long runs (prefill chunks beside the decode tokens): one slice op each, the neutral row's
    skipped."""
    long = split(meta).long
    if not long:
        return
    rows, row = pages.rows, active_values(pages, "row", meta)
    for a, b, s in long:
        r = row[s]
        if r != pages.neutral:
            if not 0 <= r < rows.shape[0]:
                raise ValueError(f"{'add_bias' if op == 0 else 'mul_rows'}: slot {s}: row {r} outside the "
                                 f"{rows.shape[0]} rows of the pages")
            (t[a:b].add_ if op == 0 else t[a:b].mul_)(rows[r])


def rows_args(pages) -> tuple:
    """``ds_rows_f32``'s arguments from ``pages`` (kept per pages object)."""
    return _args(pages, _rows_args)


def _affine_args(p) -> tuple:
    g, c = p.scale_rows, p.shift_rows
    return (g.data_ptr(), g.stride(0), c.data_ptr(), c.stride(0), g.shape[1], *_ptrs(p.row, p.flag), p.flag.shape[0],
            min(g.shape[0], c.shape[0]))


def affine_args(pages) -> tuple:
    """``ds_affine_f32``'s arguments from ``pages`` (kept per pages object)."""
    return _args(pages, _affine_args)


def native_affine(y: torch.Tensor, pages, meta: DeltaKernelMeta) -> None:
    """y[t] = y[t] * scale_rows[row] + shift_rows[row] for the tokens of the flagged active slots (``kernels.scale_shift_rows``,
    DoRA): the layout's long runs (``split``) an ``addcmul`` each, the others in the loop; every tensor ``usable``."""
    affine_long(y, pages, meta)
    raise_failed(native.library().ds_affine_f32(y.data_ptr(), y.stride(0), *affine_args(pages), *split(meta).args),
                 "scale_shift_rows", pages, meta)


def affine_long(y: torch.Tensor, pages, meta: DeltaKernelMeta) -> None:
    """``native_affine``'s long runs (prefill chunks beside the decode tokens): one fused op each."""
    long = split(meta).long
    if not long:
        return
    g, c = pages.scale_rows, pages.shift_rows
    flags, rows = pages.flag.tolist(), pages.row.tolist()
    for a, b, s in long:
        if flags[s]:
            if not 0 <= rows[s] < min(g.shape[0], c.shape[0]):
                raise ValueError(f"scale_shift_rows: slot {s}: row {rows[s]} outside the {g.shape[0]} rows of "
                                 "the pages")
            torch.addcmul(c[rows[s]], y[a:b], g[rows[s]], out=y[a:b])
