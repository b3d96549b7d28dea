"""Bottleneck adapters on the CPU backend: ``cpu_add_bottleneck`` picks a plan (``plans.choose_plan``;
never "padded") and runs it."""
from __future__ import annotations

import torch

from ..activations import ACT_FNS
from ..meta import DeltaKernelMeta
from ..pages import AdapterPages
from . import gather, grouped, looped, strided
from .plans import choose_plan
from .tensors import WS, add_rows, add_slice, apply_act, f32
from .threads import on_op_threads


ADAPTER_TENSORS = ("down_rows", "up_rows", "down_bias", "up_bias_rows", "scale")


@on_op_threads
def cpu_add_bottleneck(y: torch.Tensor, u: torch.Tensor, pages: AdapterPages, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.add_bottleneck`` (which checks the arguments; semantics and shapes there).
    ``u`` may be ``y`` itself: every plan reads a row's input before it writes that row. A run leaving the row
    tensors, or an activation code outside ``ACT_CODES``, is a ValueError."""
    if meta.no_delta or pages.max_width == 0:
        return
    widths = gather.active_values(pages, "width", meta)
    starts = gather.active_values(pages, "start", meta)
    acts = gather.active_values(pages, "act", meta)
    plan = choose_plan(meta, grouped_ok=lambda: grouped.bottleneck_ok(u, pages.down_rows, pages.up_rows),
                       dtype=y.dtype, native_ok=lambda: looped.usable_with(pages, ADAPTER_TENSORS, y, u))
    if plan == "native":  # the loop reads the tables and checks the runs and codes itself
        add_long_runs(y, u, pages, meta)
        looped.native_bottleneck(y, u, pages, meta)
        return
    work = [s for s in meta.active_slots_host if widths[s] > 0]
    if not work:
        return
    _check(starts, widths, acts, work, pages)
    if plan == "strided":
        strided.strided_bottleneck(y, u, pages, widths, starts, acts, work, meta)
        return
    if plan == "grouped":
        grouped.grouped_bottleneck(y, u, pages, widths, starts, acts, work, meta)
        return
    scales = gather.active_values(pages, "scale", meta)
    if plan in ("runs", "segments"):
        ub_rows = gather.active_values(pages, "up_bias_row", meta)
    if plan == "runs":
        for a, b, s in meta.runs_host:
            m = widths[s]
            if m:
                d = _one(u[a:b], pages, starts[s], m, acts[s], ub_rows[s])
                add_slice(y[a:b], d, scales[s])
    elif plan == "segments":
        ids = meta.sorted_active_ids
        us = u.index_select(0, ids)  # [N, h]; read before y changes (u may alias y)
        ds = WS.get("seg_d", (ids.numel(), y.shape[1]), torch.float32, y.device)
        for k, s in enumerate(meta.active_slots_host):
            a, b, m = meta.seg_start_host[k], meta.seg_start_host[k + 1], widths[s]
            if m == 0:
                ds[a:b].zero_()
                continue
            ds[a:b] = _one(us[a:b], pages, starts[s], m, acts[s], ub_rows[s]).mul_(scales[s])
        add_rows(y, ids, ds)
    else:
        for size, ids, sl, _ in gather.groups(meta, widths, work):
            _gathered(y, u, pages, ids, sl, size, sorted({acts[s] for s in work}))


def add_long_runs(y: torch.Tensor, u: torch.Tensor, pages: AdapterPages, meta: DeltaKernelMeta) -> None:
    """The native plan's long runs (``looped.split``: prefill chunks beside decode tokens): their own matmuls, as
    the runs plan (``u`` may be ``y``: each reads its rows before it adds to them; the loop's tokens are disjoint)."""
    long = looped.split(meta).long
    if not long:
        return
    widths = gather.active_values(pages, "width", meta)
    runs = [(a, b, s) for a, b, s in long if widths[s]]
    if not runs:
        return
    starts, acts = gather.active_values(pages, "start", meta), gather.active_values(pages, "act", meta)
    scales, ub_rows = gather.active_values(pages, "scale", meta), gather.active_values(pages, "up_bias_row", meta)
    _check(starts, widths, acts, [s for _, _, s in runs], pages)
    for a, b, s in runs:
        add_slice(y[a:b], _one(u[a:b], pages, starts[s], widths[s], acts[s], ub_rows[s]), scales[s])


def _check(starts: dict, widths: dict, acts: dict, work: list[int], pages: AdapterPages) -> None:
    gather.check_runs("add_bottleneck", "width", starts, widths, work, pages.down_rows.shape[0])
    for s in work:
        if acts[s] not in ACT_FNS:
            raise ValueError(f"add_bottleneck: act[{s}] = {acts[s]} is not an activation code (0..3)")


def _one(u: torch.Tensor, pages: AdapterPages, st: int, m: int, act: int, ub_row: int) -> torch.Tensor:
    """fp32 [n, h]: act(u @ D.T + db) @ U + ub for one slot's run of m rows from row ``st`` (views, no gather)."""
    h = torch.addmm(f32(pages.down_bias[st:st + m]), f32(u), f32(pages.down_rows[st:st + m]).t())  # [n, m]
    return torch.addmm(f32(pages.up_bias_rows[ub_row]), ACT_FNS[act](h), f32(pages.up_rows[st:st + m]))  # [n, h]


def _gathered(y, u, pages: AdapterPages, ids, sl, mmax: int, codes: list[int]) -> None:
    """Gathered plan on tokens ``ids`` (None = all) with slots ``sl`` [n], widths <= mmax; ``u`` may be
    ``y``: groups hold disjoint tokens and each reads its rows before adding to them."""
    n, hid = sl.numel(), y.shape[1]
    us = f32(u if ids is None else u.index_select(0, ids))  # [n, h]
    rows = gather.row_index(pages.start, pages.width, sl, mmax)  # [n, mmax], clamped to each slot's run
    h = torch.bmm(us.unsqueeze(1), gather.rows(pages.down_rows, rows, "bn_down").transpose(1, 2),
                  out=WS.get("bn_h", (n, 1, mmax), torch.float32, y.device)).view(n, mmax)
    h.add_(f32(pages.down_bias.index_select(0, rows.reshape(-1)).view(n, mmax)))
    h = apply_act(h, codes, pages.act.index_select(0, sl) if len(codes) > 1 else None)
    tok_width = pages.width.index_select(0, sl)  # [n]; every slot here has width > 0
    h.mul_(torch.arange(mmax, device=y.device) < tok_width.unsqueeze(1))  # past the slot's width: 0
    d = torch.bmm(h.unsqueeze(1), gather.rows(pages.up_rows, rows, "bn_up"),
                  out=WS.get("bn_d", (n, 1, hid), torch.float32, y.device)).view(n, hid)
    ub = pages.up_bias_rows.index_select(0, pages.up_bias_row.index_select(0, sl).long())  # [n, h]
    d.add_(f32(ub)).mul_(pages.scale.index_select(0, sl).unsqueeze(1))
    add_rows(y, ids, d)
