"""SharedInput: wrapped sibling projections that the HF forward calls on the same input tensor (q/k/v of one
attention, gate/up of one MLP) do their LoRA shrink as one op (``kernels.shrink_lora``; vLLM's packed modules,
Punica's fused shrink), then each its own expand.

Storage (D13, nothing padded). The group's *leader* (its first member in call order) keeps, per slot, one
*stack*: every member's LoRA rows ``A row | B column`` back to back in member order, one cell of its ``lora``
arena (``pages.py``); the other members keep no LoRA rows of their own. Members of one group have the same in
and out widths, so the stack's rows are exactly the rows the members held apart: a rank-8 q, k and v take one
cell of 24 rows (bucket 25) where they took three of 8. Siblings of other widths (GQA: k/v 192 wide beside q's
576 on the 30-layer benchmark model) go to different groups: sharing one row width would store k/v's B columns
576 wide, 1.2x the real bytes of a q/v delta there and 1.33x for q/k/v on Llama-3-8B's 4096 -> 1024 k/v.

Per-slot fields: the leader's ``lora_start`` is the stack's first row and its ``lora_stack`` the stack's rows;
a member's ``lora_offset`` is its run's row in the stack and its ``lora_start`` = leader start + offset, rewritten
here after every install, clear and relayout (``sync``). Each member's ``lora_pages()`` views the leader's
arena, so ``kernels.add_lora`` on one member alone still reads the right rows (the fallback below).

Step path. The first member called with ``x`` runs the shrink for every member with LoRA on an active slot and
keeps it; each member then adds its expand (``add_to``). The shared result is used only for the very same
input object in the same step (``x is`` the kept one, the same meta), and dropped once every such member used
it, so it never outlives its input; a member called on another tensor computes its own shrink. Base-only
tokens and slots without LoRA at a member are never touched (the op reads only members' own ranks).
"""
from __future__ import annotations

import torch

import kernels

FAMILIES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Leaf names of siblings that Llama / Mistral / Qwen2 (and their HF relatives) call on one input tensor, in call
order. The step path checks the input object at run time, so a model that calls them on different tensors is
still exact, only unfused."""

CPU_MIN_TOKENS = 4
"""On the CPU backend siblings share their shrink from this many active tokens: below it the packed op's host
prelude costs more than the matmul it saves (bench_kernels --quick on the merged tree, one token of one rank-16
delta: packed q/k/v 1.45x of three add_lora, which now take their few-runs path; pairs 1.13-1.24x before it).
Nor do they share where each member's own op takes the strided decode plan (fp32, at most ``STRIDED_MAX_SEG``
tokens a slot): the packed op has none and runs the grouped plan there, 1.40x (q/k/v) / 1.35x (gate/up) of the
members' strided add_lora at 32 tokens of 32 deltas. Where it does share on the CPU (prefill, uneven decode) it
took 0.89x. Nor where the step's ops are bound (``kernels.step_ops``: fp32 CPU steps with a run shorter than 8
tokens, decode and prefill chunks beside it): each member then runs one C loop over its own rows, which reads each
stack row once either way and needs no packed pages, shrink buffer or kept result (``linear.py``), and its own
matmuls on the chunks (a prefill alone still shares). On Triton every step shares: it saves
a launch."""


class SharedInput:
    def __init__(self, members: list):
        self.members = list(members)  # DeltaLinear, call order; members[0] holds the stacks
        self.leader = self.members[0]
        self.index = {id(m): i for i, m in enumerate(self.members)}
        self.epoch = 0  # bumped by every write: the packed pages are rebuilt after it
        self._pages: tuple | None = None  # (key, kernels.PackedLoraPages)
        self._seen = -1  # the leader arena version the members' lora_start were last written for
        self._live: list | None = None  # [x, meta, shrink, members still to expand, member -> pages position]
        # The step meta for which sharing was found not worth it (it depends on the meta and the members' terms only,
        # and installs happen between steps): its other members skip the test (~15 us each at 32 active slots).
        self._direct = None
        for m in self.members:
            m.shared = self

    @property
    def arena(self):
        return self.leader.rows.arenas["lora"]

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.members]

    # ---- load path (host) ----------------------------------------------------------------------
    def restage(self, modules: dict) -> None:
        """Move the members' staged LoRA rows (``DeltaLinear.stage``) into one stack on the leader, in place in
        ``modules`` (path -> Staged); each member keeps its rank and scale, and learns its offset."""
        from .terms import Staged

        parts, offset = [], 0
        for m in self.members:
            st = modules.get(m.path)
            if st is None or "lora" not in st.rows:
                if st is not None:
                    st.values["lora_offset"] = 0
                continue
            rows = st.rows.pop("lora")
            st.values["lora_offset"] = offset
            parts.append(rows)
            offset += rows.shape[0]
        lead = modules.get(self.leader.path)
        if not parts:
            if lead is not None:
                lead.values["lora_stack"] = 0
            return
        stack = torch.cat(parts) if len(parts) > 1 else parts[0]  # [R, in_pad + out]
        if parts[0].is_pinned():
            stack = stack.pin_memory()
        if lead is None:
            lead = modules[self.leader.path] = Staged({}, {}, set())
        lead.rows["lora"] = stack
        lead.values["lora_stack"] = offset

    def term_rows(self, rows: dict[str, dict[str, int]]) -> None:
        """``rows`` (path -> term rows, ``DeltaLinear.term_rows``) as the layers hold them once staged by
        ``restage``: the members' LoRA rows as one stack on the leader (what the footprint counts)."""
        total = 0
        for m in self.members:
            r = rows.get(m.path, {}).pop("lora", 0)
            total += r
        if total:
            rows.setdefault(self.leader.path, {})["lora"] = total

    # ---- the step loop's writes ----------------------------------------------------------------
    def sync(self) -> None:
        """Point every member's ``lora_start`` at its run of its slot's stack (after installs, clears and
        relayouts of the leader's arena); drop the kept shrink and the packed pages."""
        self.epoch += 1
        self._live = self._direct = None
        lead = self.leader.rows.fields
        if not lead.allocated:
            return
        starts = lead.host["lora_start"]
        for m in self.members[1:]:
            f = m.rows.fields
            if not f.allocated:
                continue
            host = f.host
            want = [starts[s] + host["lora_offset"][s] if host["lora_rank"][s] else host["lora_start"][s]
                    for s in range(f.capacity)]
            if want != host["lora_start"]:
                host["lora_start"][:] = want  # in place: the pages' host mirrors hold this very list
                f.refresh("lora_start")

    # ---- step path -----------------------------------------------------------------------------
    def pages(self) -> tuple[kernels.PackedLoraPages, dict[int, int]]:
        """The packed pages over the members that hold LoRA here (the others may have no slot table at all) and
        member index -> its position in ``pages.members``."""
        have = [i for i, m in enumerate(self.members) if m.has["lora"]]
        members = tuple(self.members[i].lora_pages() for i in have)
        lead = self.leader.rows.fields
        key = (self.epoch, self.arena.version, lead.version, tuple(id(p) for p in members))
        if self._pages is None or self._pages[0] != key:
            top = max(lead.host["lora_stack"], default=0)
            packed = kernels.PackedLoraPages(self.arena.rows[:, :self.leader.in_features], lead.view("lora_start"),
                                             lead.view("lora_stack"), top, members,
                                             host={"start": lead.host["lora_start"], "rank": lead.host["lora_stack"]})
            self._pages = (key, packed, {i: k for k, i in enumerate(have)})
        return self._pages[1], self._pages[2]

    def add_lora(self, member, y2: torch.Tensor, x: torch.Tensor, x2: torch.Tensor, meta) -> None:
        """y2 += member's LoRA of ``x`` (``x2`` its [T, in] view): from the shrink kept for ``x`` this step, or a
        new one shared with the siblings still to come."""
        if self._direct is meta:  # decided for this step's meta already: nothing (worth) sharing
            kernels.add_lora(y2, x2.contiguous(), member.lora_pages(), meta)
            return
        live = self._live
        if live is None or live[0] is not x or live[1] is not meta:
            active = meta.active_slots_host
            todo = {i for i, m in enumerate(self.members)
                    if m.has["lora"] and any(s in m.has["lora"] for s in active)}
            on_cpu = kernels.current_backend(x2) == "cpu"
            if len(todo) < 2 or (on_cpu and (meta.num_active_tokens < CPU_MIN_TOKENS
                                             or kernels.cpu.choose_plan(meta, dtype=x2.dtype) == "strided")):
                self._direct = meta  # the other members of this step take the same way without asking again
                kernels.add_lora(y2, x2.contiguous(), member.lora_pages(), meta)  # nothing (worth) sharing
                return
            packed, pos = self.pages()
            live = self._live = [x, meta, kernels.shrink_lora(x2.contiguous(), packed, meta), todo, pos]
        i = self.index[id(member)]
        live[2].add_to(y2, live[4][i])
        live[3].discard(i)
        if not live[3]:
            self._live = None  # every member served: never keep the input alive past its last reader


def find_groups(layers: dict) -> list[SharedInput]:
    """Groups of wrapped ``nn.Linear`` siblings of one parent (``FAMILIES``) with equal in / out widths, dtype and
    device; a family of mixed widths splits by width (GQA: k/v apart from q)."""
    from .linear import DeltaLinear

    groups = []
    parents = {p.rpartition(".")[0] for p in layers}
    for parent in sorted(parents):
        for family in FAMILIES:
            found = [layers.get(f"{parent}.{leaf}") for leaf in family]
            found = [m for m in found if isinstance(m, DeltaLinear) and type(m.base) is torch.nn.Linear]
            by_shape: dict[tuple, list] = {}
            for m in found:
                w = m.base.weight
                by_shape.setdefault((m.in_features, m.out_features, w.dtype, w.device), []).append(m)
            groups += [SharedInput(ms) for ms in by_shape.values() if len(ms) > 1]
    return groups
