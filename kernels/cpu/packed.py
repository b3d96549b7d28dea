"""Packed LoRA on the CPU backend: one matmul (or one ``F.grouped_mm``) over each slot's stack of A rows for all
the siblings that read the same input, then each member's expand from its columns (``kernels.PackedLoraPages``).

``cpu_shrink_lora`` runs the shrink and returns a :class:`CpuLoraShrink`, whose ``add_to(y, m)`` adds member
m's LoRA into its output. Three plans, chosen as ``plans.choose_plan`` chooses for ``add_lora``:

* runs: one ``x[a:b] @ stack.T`` per run of one slot (prefill; decode of a few requests), member m's expand an
  ``addmm_`` of its column slice ``h[:, o:o+r]`` on the run's rows: no gather, no scatter.
* grouped (fp32, grouped_mm runs and the rows are aligned): the slots of one *composition* (the same
  (offset, rank) of every member in their stacks) form clusters of evenly spaced stacks (``grouped.groups``),
  so the shrink is one grouped_mm over ``[G, R, in]`` cell views, and member m's expand one grouped_mm over the
  ``[G, r_m, out]`` views of its rows at offset o in each cell: the cells of member m are evenly spaced too.
* segments (everything else: fp16/bf16 decode, misaligned widths): tokens gathered by slot, one matmul per
  slot's stack, one per slot and member for the expands, scattered back.

Intermediates are fp32, as in ``lora.py``; every read stays inside a slot's stack and every member's rows
inside it (checked from the host mirrors before anything is read)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..meta import DeltaKernelMeta
from ..pages import PackedLoraPages
from . import gather, grouped
from .plans import choose_plan
from .tensors import WS, add_rows, f32
from .threads import on_op_threads


class CpuLoraShrink:
    """The shrink of one call: fp32 pieces of ``h`` per run / cluster / segment and the host values the expands
    need. Valid for the ``x``, ``pages`` and ``meta`` it was computed on."""

    __slots__ = ("pages", "meta", "plan", "parts", "starts", "member_starts", "member_ranks")

    def __init__(self, pages: PackedLoraPages, meta: DeltaKernelMeta, plan: str, parts: list, starts: dict,
                 member_starts: list[dict], member_ranks: list[dict]):
        self.pages, self.meta, self.plan, self.parts = pages, meta, plan, parts
        self.starts, self.member_starts, self.member_ranks = starts, member_starts, member_ranks

    def add_to(self, y: torch.Tensor, member: int) -> None:
        cpu_expand_lora(y, self, member)


@on_op_threads
def cpu_shrink_lora(x: torch.Tensor, pages: PackedLoraPages, meta: DeltaKernelMeta) -> CpuLoraShrink:
    """The CPU backend of ``kernels.shrink_lora`` (which checks the arguments; semantics in
    ``kernels.PackedLoraPages``). A stack or a member's run leaving its rows is a ValueError."""
    if meta.no_delta or pages.max_rank == 0:
        return CpuLoraShrink(pages, meta, "none", [], {}, [], [])
    ranks = gather.active_values(pages, "rank", meta)
    starts = gather.active_values(pages, "start", meta)
    work = [s for s in meta.active_slots_host if ranks[s] > 0]
    gather.check_runs("shrink_lora", "stack rank", starts, ranks, work, pages.a_rows.shape[0])
    m_starts = [gather.active_values(mp, "start", meta) for mp in pages.members]
    m_ranks = [gather.active_values(mp, "rank", meta) for mp in pages.members]
    for m, (ms, mr) in enumerate(zip(m_starts, m_ranks)):
        for s in meta.active_slots_host:
            r = mr[s]
            if r and (ms[s] < starts[s] or ms[s] + r > starts[s] + ranks[s]):
                raise ValueError(f"shrink_lora: slot {s}: member {m}'s rank {r} from row {ms[s]} leaves its stack "
                                 f"of {ranks[s]} rows from row {starts[s]}")
    if not work:
        return CpuLoraShrink(pages, meta, "none", [], starts, m_starts, m_ranks)

    def grouped_ok() -> bool:
        return all(grouped.lora_ok(x, pages.a_rows, mp.b_rows) for mp in pages.members)

    plan = choose_plan(meta, padded_ok=False, grouped_ok=grouped_ok, dtype=x.dtype)
    if plan == "strided":  # no packed strided shrink yet: the plan add_lora's chooser took before it
        plan = "grouped" if grouped_ok() else "segments"
    if plan == "runs":
        a_rows = pages.a_rows
        if len(meta.runs_host) == 1 and meta.all_tokens_active:  # one run of every token: no row slices
            s = meta.runs_host[0][2]
            parts = [(0, meta.num_tokens, s, _mm(x, a_rows[starts[s]:starts[s] + ranks[s]]))]
        else:
            parts = [(a, b, s, _mm(x[a:b], a_rows[starts[s]:starts[s] + ranks[s]]))
                     for a, b, s in meta.runs_host if ranks[s]]
    elif plan == "grouped":
        parts = _grouped_shrink(x, pages, meta, starts, ranks, work, m_starts, m_ranks)
    else:
        plan = "segments"
        xs = x.index_select(0, meta.sorted_active_ids)  # [N, in]
        parts = []
        for k, s in enumerate(meta.active_slots_host):
            if ranks[s]:
                a, b = meta.seg_start_host[k], meta.seg_start_host[k + 1]
                parts.append((a, b, s, _mm(xs[a:b], pages.a_rows[starts[s]:starts[s] + ranks[s]])))
    return CpuLoraShrink(pages, meta, plan, parts, starts, m_starts, m_ranks)


def _mm(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """fp32 [n, R] = x [n, in] @ a [R, in].T."""
    return torch.mm(x, a.t()) if x.dtype == torch.float32 else torch.mm(x.float(), a.float().t())


def _grouped_shrink(x, pages: PackedLoraPages, meta, starts, ranks, work, m_starts, m_ranks) -> list:
    """(group, composition, h [n, R]) per cluster of the slots of one composition."""
    by_comp: dict[tuple, list[int]] = {}
    for s in work:
        comp = tuple((ms[s] - starts[s], mr[s]) for ms, mr in zip(m_starts, m_ranks))
        by_comp.setdefault(comp, []).append(s)
    parts = []
    for comp, slots in by_comp.items():
        for grp in grouped.groups(meta, ranks, starts, slots):
            xs = x.contiguous() if grp.ids is None else x.index_select(0, grp.ids)  # [n, in]
            first = starts[grp.members[0]]
            h = F.grouped_mm(xs, grp.view(pages.a_rows, first).transpose(1, 2), offs=grp.offs)  # [n, R] fp32
            parts.append((grp, comp, first, h))
    return parts


@on_op_threads
def cpu_expand_lora(y: torch.Tensor, sh: CpuLoraShrink, member: int) -> None:
    """y[t] += scale_m[s] * h[t, o:o+r] @ B_m rows (``CpuLoraShrink.add_to``; ``kernels/_checks.py`` checked y)."""
    if not sh.parts:
        return
    mp = sh.pages.members[member]
    ms, mr = sh.member_starts[member], sh.member_ranks[member]
    if sh.plan == "runs":
        scales = gather.active_values(mp, "scale", sh.meta)
        whole = sh.parts[0][1] - sh.parts[0][0] == sh.meta.num_tokens  # one run of every token
        for a, b, s, h in sh.parts:
            r = mr[s]
            if r:
                o, st = ms[s] - sh.starts[s], ms[s]
                _add(y if whole else y[a:b], h[:, o:o + r], mp.b_rows[st:st + r], scales[s])
    elif sh.plan == "grouped":
        for grp, comp, first, h in sh.parts:
            o, r = comp[member]
            if r == 0:
                continue
            hp = grouped.aligned_empty(grp.num_tokens, r, torch.float32, y.device)  # [n, r], 16-byte rows
            torch.mul(h[:, o:o + r], mp.scale.index_select(0, grp.slots).unsqueeze(1), out=hp)
            rs = mp.b_rows.stride(0)
            b = mp.b_rows.as_strided((grp.num_cells, r, mp.b_rows.shape[1]), (grp.stride * rs, rs, 1),
                                     mp.b_rows.storage_offset() + (first + o) * rs)  # [G, r, out] cell views
            add_rows(y, grp.ids, F.grouped_mm(hp, b, offs=grp.offs))
    else:
        scales = gather.active_values(mp, "scale", sh.meta)
        ids = sh.meta.sorted_active_ids  # [N]
        ds = WS.get("packed_d", (ids.numel(), y.shape[1]), torch.float32, y.device)  # [N, out]
        ds.zero_()
        for a, b, s, h in sh.parts:
            r = mr[s]
            if r:
                o, st = ms[s] - sh.starts[s], ms[s]
                torch.mm(h[:, o:o + r], f32(mp.b_rows[st:st + r]), out=ds[a:b]).mul_(scales[s])
        add_rows(y, ids, ds)


def _add(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """y [n, out] += scale * h [n, r] (fp32) @ b [r, out], rounded once in y's dtype."""
    if y.dtype == torch.float32:
        y.addmm_(h, b, alpha=scale)
    else:
        y.copy_(y.float().addmm_(h, b.float(), alpha=scale))
