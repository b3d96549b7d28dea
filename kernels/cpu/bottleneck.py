"""Bottleneck adapters on the CPU backend: ``cpu_add_bottleneck`` picks a plan (``plans.choose_plan``;
never "padded") and runs it."""
from __future__ import annotations

import torch

from ..activations import ACT_FNS
from ..meta import DeltaKernelMeta
from . import gather, grouped
from .plans import choose_plan
from .tensors import WS, add_rows, add_slice, apply_act, f32
from .threads import on_op_threads


@on_op_threads
def cpu_add_bottleneck(y: torch.Tensor, u: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
                       up: torch.Tensor, up_bias: torch.Tensor, scale: torch.Tensor, width: torch.Tensor,
                       act: torch.Tensor, meta: DeltaKernelMeta) -> None:
    """The CPU backend of ``kernels.add_bottleneck`` (which checks the arguments; semantics and shapes there).
    ``u`` may be ``y`` itself: every plan reads a row's input before it writes that row. A width beyond the
    pool's padded size, or an activation code outside ``ACT_CODES``, is a ValueError."""
    if meta.no_delta:
        return
    widths = width.tolist()
    work = [s for s in meta.active_slots_host if widths[s] > 0]
    if not work:
        return
    gather.check_limit("add_bottleneck", "width", widths, work, down.shape[1])
    acts = act.tolist()
    for s in work:
        if acts[s] not in ACT_FNS:
            raise ValueError(f"add_bottleneck: act[{s}] = {acts[s]} is not an activation code (0..3)")
    scales = scale.tolist()
    plan = choose_plan(meta, grouped_ok=grouped.bottleneck_ok(u, down, up), dtype=y.dtype)
    if plan == "grouped":
        grouped.grouped_bottleneck(y, u, down, down_bias, up, up_bias, scale, act, widths, acts, work, meta)
    elif plan == "runs":
        for a, b, s in meta.runs_host:
            m = widths[s]
            if m:
                h = torch.addmm(f32(down_bias[s, :m]), f32(u[a:b]), f32(down[s, :m]).t())  # [n, m]
                d = torch.addmm(f32(up_bias[s]), ACT_FNS[acts[s]](h), f32(up[s, :, :m]).t())  # [n, h]
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
            h = torch.addmm(f32(down_bias[s, :m]), f32(us[a:b]), f32(down[s, :m]).t())
            torch.addmm(f32(up_bias[s]), ACT_FNS[acts[s]](h), f32(up[s, :, :m]).t(), out=ds[a:b]).mul_(scales[s])
        add_rows(y, ids, ds)
    else:
        for size, ids, sl, _ in gather.groups(meta, widths, work):
            _gathered(y, u, down, down_bias, up, up_bias, scale, width, act, ids, sl, size,
                      sorted({acts[s] for s in work}))


def _gathered(y, u, down, down_bias, up, up_bias, scale, width, act, ids, sl, mmax: int, codes: list[int]) -> None:
    """Gathered plan on tokens ``ids`` (None = all) with slots ``sl`` [n], widths <= mmax; ``u`` may be
    ``y``: groups hold disjoint tokens and each reads its rows before adding to them."""
    n, hid = sl.numel(), y.shape[1]
    us = f32(u if ids is None else u.index_select(0, ids))  # [n, h]
    h = torch.bmm(us.unsqueeze(1), gather.rows(down[:, :mmax], sl, "bn_down").transpose(1, 2),
                  out=WS.get("bn_h", (n, 1, mmax), torch.float32, y.device)).view(n, mmax)
    h.add_(f32(down_bias[:, :mmax].index_select(0, sl)))
    h = apply_act(h, codes, act.index_select(0, sl) if len(codes) > 1 else None)
    tok_width = width.index_select(0, sl)  # [n]; width 0 = no adapter here, up_bias included
    h.mul_(torch.arange(mmax, device=y.device) < tok_width.unsqueeze(1))  # past the slot's width: 0
    d = torch.bmm(h.unsqueeze(1), gather.up_rows(up, mmax, sl, "bn_up"),
                  out=WS.get("bn_d", (n, 1, hid), torch.float32, y.device)).view(n, hid)
    d.add_(f32(up_bias.index_select(0, sl))).mul_((scale.index_select(0, sl) * (tok_width > 0)).unsqueeze(1))
    add_rows(y, ids, d)
