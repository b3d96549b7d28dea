"""TermRows: the part every wrapped layer shares: its arenas, its per-slot table and which cell holds which term.

A *term* is one tensor family of one delta at one layer ("lora", "bias", "out_scale", "in_scale", "adapter",
"up_bias"), stored as rows of one arena (``pages.RowArena``). A layer declares its arenas and terms once;
TermRows then stages a term on the host (the load thread), says which cells a delta needs (the owner's
budget and the arenas' growth), places staged rows into cells (the step loop) and frees them, and keeps
each slot's first-row fields in the layer's ``SlotFields`` right, also after a relayout moved every cell.

Terms of one row (biases and (IA)3 vectors) need a *neutral* row in their arena for the slots without the
term (zeros for an added bias, ones for a scale): ``y + 0.0 == y`` and ``y * 1.0 == y`` in IEEE arithmetic,
so a step mixing slots with and without the term stays exact for every token. A neutral row is a cell like
any other, taken with the arena's first term and given back with its last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .pages import Cell, NoRoom, RowArena
from .slot_fields import SlotFields


@dataclass(frozen=True, slots=True)
class TermSpec:
    arena: str  # which of the layer's arenas holds it
    field: str  # the slot field holding the term's first row
    neutral: float | None = None  # value of the neutral row slots without the term point at; None: no neutral


class Staged:
    """One module's terms ready to copy: host rows per term, the slot's other field values, the kinds."""

    __slots__ = ("rows", "values", "kinds")

    def __init__(self, rows: dict[str, torch.Tensor], values: dict, kinds: set[str]):
        self.rows, self.values, self.kinds = rows, values, kinds


def align(n: int, dtype: torch.dtype) -> int:
    """``n`` rounded up to a 16-byte multiple of ``dtype`` elements (grouped_mm's layout rule; aligned columns)."""
    a = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    return -(-n // a) * a


class TermRows:
    def __init__(self, arenas: dict[str, RowArena], terms: dict[str, TermSpec], fields: SlotFields):
        self.arenas = arenas
        self.terms = terms
        self.fields = fields
        self.cells: dict[int, dict[str, Cell]] = {}  # slot -> term -> cell
        self.neutral: dict[tuple[str, float], Cell] = {}  # (arena, value) -> the neutral row's cell
        self._versions = {name: a.version for name, a in arenas.items()}

    @property
    def slots(self):
        """Slots with at least one term here."""
        return self.cells.keys()

    # ---- sizes ---------------------------------------------------------------------------------
    def demand(self, term_rows: dict[str, int], *, all_neutrals: bool = False) -> dict[str, list[int]]:
        """Rows of every cell terms of ``term_rows`` rows need, per arena, with the neutral rows this layer lacks
        (``all_neutrals``: every neutral row they use, whether the layer has it or not)."""
        need: dict[str, list[int]] = {}
        neutrals: set[tuple[str, float]] = set()
        for term, n in term_rows.items():
            spec = self.terms[term]
            need.setdefault(spec.arena, []).append(n)
            key = (spec.arena, spec.neutral)
            if spec.neutral is not None and key not in neutrals and (all_neutrals or key not in self.neutral):
                neutrals.add(key)
                need[spec.arena].append(1)
        return need

    def footprint(self, term_rows: dict[str, int]) -> int:
        """Bytes terms of ``term_rows`` rows hold once placed: bucketed cells and the neutral rows they use."""
        return sum(self.arenas[a].cell_bytes(n) for a, sizes in self.demand(term_rows, all_neutrals=True).items()
                   for n in sizes)

    @property
    def capacity_bytes(self) -> int:
        return sum(a.nbytes for a in self.arenas.values()) + self.fields.nbytes

    @property
    def held_bytes(self) -> int:
        return sum(a.held_bytes for a in self.arenas.values()) + self.fields.nbytes

    # ---- the step loop's writes ----------------------------------------------------------------
    def grow(self, demand: dict[str, list[int]], room: int) -> int:
        """Grow arenas so that ``demand`` can be placed, adding at most ``room`` bytes (each arena its exact
        growth plus a share of the rest as slack); NoRoom, nothing changed, if the exact growth exceeds it."""
        exact = {name: self.arenas[name].growth_rows(sizes) * self.arenas[name].row_bytes
                 for name, sizes in demand.items()}
        total = sum(exact.values())
        if total > room:
            raise NoRoom(f"arenas need {total} more bytes, {room} left")
        spare, added = room - total, 0
        for name, sizes in demand.items():
            if exact[name]:
                added += self.arenas[name].grow(sizes, exact[name] + spare * exact[name] // total)
        self._after_relayout()
        return added

    def growth_bytes(self, demand: dict[str, list[int]]) -> int:
        return sum(self.arenas[a].growth_rows(sizes) * self.arenas[a].row_bytes for a, sizes in demand.items())

    def ensure(self, capacity: int) -> None:
        """Fields for slots [0, capacity); new slots point at the neutral rows."""
        if self.fields.allocated and capacity <= self.fields.capacity:
            return
        self.fields.ensure(capacity, defaults={**self.fields.defaults, **self._defaults()})

    def place(self, slot: int, staged: dict[str, torch.Tensor], capacity: int, **values) -> None:
        """Put ``slot``'s staged terms into free cells (``grow`` made room), point its row fields at them and set
        the other ``values`` (ranks, scales, ...); every field of the slot not given goes to its default."""
        self.ensure(capacity)
        if slot in self.cells:
            self.clear(slot, keep_neutrals=True)  # the demand counted on them
        cells: dict[str, Cell] = {}
        for term, rows in staged.items():
            spec = self.terms[term]
            arena = self.arenas[spec.arena]
            if spec.neutral is not None:
                self._neutral(spec)
            cell = arena.alloc(rows.shape[0])
            if cell is None:
                for c_term, c in cells.items():
                    self.arenas[self.terms[c_term].arena].free(c)
                raise NoRoom(f"{spec.arena} arena has no free cell of {rows.shape[0]} rows (grow it first)")
            arena.write(cell, rows)
            cells[term] = cell
        self.cells[slot] = cells
        rows = {self.terms[t].field: self.arenas[self.terms[t].arena].start(c) for t, c in cells.items()}
        self.fields.set(slot, **{**self.fields.defaults, **self._defaults(), **values, **rows})

    def clear(self, slot: int, *, keep_neutrals: bool = False) -> None:
        """Free ``slot``'s cells; its fields go back to the defaults (neutral rows where the arena lives)."""
        cells = self.cells.pop(slot, None)
        if cells is None:
            return  # nothing here: its fields hold the defaults already
        for term, cell in cells.items():
            self.arenas[self.terms[term].arena].free(cell)
        if not keep_neutrals:
            self._drop_unused_neutrals()
        self.fields.set(slot, **{**self.fields.defaults, **self._defaults()})

    def compact(self) -> int:
        freed = sum(a.compact() for a in self.arenas.values())
        self._after_relayout()
        return freed

    # ---- internals -----------------------------------------------------------------------------
    def _neutral(self, spec: TermSpec) -> None:
        key = (spec.arena, spec.neutral)
        if key in self.neutral:
            return
        arena = self.arenas[spec.arena]
        cell = arena.alloc(1)
        if cell is None:
            raise NoRoom(f"{spec.arena} arena has no free cell for its neutral row (grow it first)")
        arena.write(cell, torch.full((1, arena.width), spec.neutral, dtype=arena.dtype))
        self.neutral[key] = cell
        self._refresh_fields(spec.arena)

    def _drop_unused_neutrals(self) -> None:
        used = {(self.terms[t].arena, self.terms[t].neutral) for cells in self.cells.values() for t in cells}
        for key in [k for k in self.neutral if k not in used]:
            self.arenas[key[0]].free(self.neutral.pop(key))

    def neutral_row(self, spec: TermSpec) -> int:
        """The first row of the neutral cell that slots without ``spec``'s term point at, or -1 (none now: it comes
        with the arena's first such term and goes back with its last)."""
        cell = self.neutral.get((spec.arena, spec.neutral)) if spec.neutral is not None else None
        return -1 if cell is None else self.arenas[spec.arena].start(cell)

    def _defaults(self) -> dict:
        values = {}
        for spec in self.terms.values():
            row = self.neutral_row(spec)
            values[spec.field] = row if row >= 0 else 0
        return values

    def _after_relayout(self) -> None:
        for name, arena in self.arenas.items():
            if arena.version != self._versions[name]:
                self._versions[name] = arena.version
                self._refresh_fields(name)

    def _refresh_fields(self, arena_name: str) -> None:
        """Rewrite every slot's first-row fields of terms in ``arena_name`` (cells moved, or a neutral row came)."""
        if not self.fields.allocated:
            return
        arena = self.arenas[arena_name]
        defaults = self._defaults()
        for term, spec in self.terms.items():
            if spec.arena != arena_name:
                continue
            host = [defaults[spec.field]] * self.fields.capacity  # every slot without the term: O(capacity) in C
            for s, cells in self.cells.items():
                cell = cells.get(term)
                if cell is not None:
                    host[s] = arena.start(cell)
            self.fields.host[spec.field][:] = host  # in place: pages hold this list as their host mirror
            self.fields.refresh(spec.field)
