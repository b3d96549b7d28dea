"""How the ops read paged delta storage: row tensors and one int32 row index per slot (D13).

A delta's term at one layer is a run of consecutive *rows* of a row tensor (LoRA: ``rank`` rows of A and of
B transposed; a bottleneck adapter: ``width`` rows of down and of up; BitFit and (IA)3: one row). Where a
slot's run starts is an int32 row index, ``start[slot]`` (a run) or ``row[slot]`` (one row): an index
into one tensor, never a pointer (the Triton interpreter cannot load pointers), so every op is still one
launch over all active slots whatever their rank, and the storage can place each run anywhere::

    A of slot s    = a_rows[start[s] : start[s] + rank[s]]          # [rank, in]
    B of slot s    = b_rows[start[s] : start[s] + rank[s]].T        # [out, rank]

Nothing here allocates or places anything: the server's arenas (``server/deltas/pages.py``) decide where
runs go; the ops only follow the indices. Rows past a slot's own rank (or width) never reach a result (the CPU
strided plan reads the cells between a block's members and drops them; nothing else reads them), so they may
hold anything, another tenant's values or NaN. A run's rows are consecutive, so the CPU
backend reads them as plain views (prefill, per-run matmuls) and, where runs of equal rank are evenly
spaced (the arenas' rank-bucket regions), as one strided ``[G, rank, in]`` view for ``torch.bmm`` (decode) or
``F.grouped_mm``.

Running example, two slots, in = 3, out = 2, a_rows and b_rows the column halves of one [6, 5] tensor::

    slot 0: rank 2, start 4   -> A0 = a_rows[4:6], B0 = b_rows[4:6].T
    slot 1: rank 1, start 0   -> A1 = a_rows[0:1], B1 = b_rows[0:1].T      rows 1..3 unused (anything)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MEMO = """``memo``: what a backend derived from a pages object's tensors (the CPU native loops' pointers and sizes, its
verdict on them), kept with the object: its tensors never change (a layer builds a new object when its storage
moves), and a plain dict is read per call where a weak-keyed table cost a weakref per lookup. Not an argument:
``dataclasses.replace`` starts a new one."""

HOST_MIRRORS = """``host``: the caller's own host copies of a pages object's per-slot tables, ``{field name: list indexed by
slot}`` (``"start"``, ``"rank"``, ``"scale"``, ...), kept equal to the device tensors whenever an op runs (the
server's slot tables write both; ``server/deltas/slot_fields.py``). The CPU backend then reads a slot's rank and
first row from the list instead of copying the table back per call: three ``tolist`` of a 2-slot table were
5 us of a 66 us ``add_lora`` at T = 1 (576 -> 576, rank 8, one thread). The Triton kernels never read them; a
table without a mirror is read from its tensor."""


@dataclass(frozen=True, eq=False)
class LoraPages:
    """LoRA of every slot at one layer: y[t] += scale[s] * (x[t] @ A_s.T) @ B_s.T, s = slot of t."""

    a_rows: torch.Tensor  # [N, in]; unit stride on the last dim, any row stride
    b_rows: torch.Tensor  # [N, out]; B transposed, row j of slot s = column j of B_s
    start: torch.Tensor  # int32 [S] first row of each slot's run (shared by a_rows and b_rows)
    rank: torch.Tensor  # int32 [S] rows of each run; 0 = no LoRA at this layer
    scale: torch.Tensor  # fp32 [S]
    max_rank: int  # host bound on rank[s] (sizes the Triton grid and fp32 buffer; never a storage size)
    host: dict | None = None  # optional live host mirrors of the tables above, by field name (HOST_MIRRORS)
    memo: dict = field(default_factory=dict, init=False, repr=False)  # a backend's memo of this object (MEMO)


@dataclass(frozen=True, eq=False)
class AdapterPages:
    """Bottleneck adapters at one layer, for one source (``scale``/``width`` are that source's):
    y[t] += scale[s] * (act_s(u[t] @ D_s.T + db_s) @ U_s.T + ub_s), D_s = down_rows[start : start + width],
    db_s = down_bias[start : start + width], U_s = up_rows[start : start + width].T, ub_s = up_bias_rows[ub_row]."""

    down_rows: torch.Tensor  # [N, h]
    up_rows: torch.Tensor  # [N, h]; up transposed
    down_bias: torch.Tensor  # [N] one value per down row (any stride)
    up_bias_rows: torch.Tensor  # [Nv, h]
    start: torch.Tensor  # int32 [S] first row of each slot's run in down_rows / up_rows / down_bias
    up_bias_row: torch.Tensor  # int32 [S] row of up_bias_rows
    width: torch.Tensor  # int32 [S]; 0 = no adapter of this source here (no up bias either)
    scale: torch.Tensor  # fp32 [S]
    act: torch.Tensor  # int32 [S] activation code (kernels.ACT_CODES)
    max_width: int  # host bound on width[s]
    host: dict | None = None  # optional live host mirrors of the tables above, by field name (HOST_MIRRORS)
    memo: dict = field(default_factory=dict, init=False, repr=False)  # a backend's memo of this object (MEMO)


@dataclass(frozen=True, eq=False)
class RowPages:
    """One row per slot: BitFit biases (add_bias) and (IA)3 vectors (mul_rows)."""

    rows: torch.Tensor  # [N, n]
    row: torch.Tensor  # int32 [S] row of each slot; slots without the term point at a neutral row
    host: dict | None = None  # optional live host mirror {"row": list} (HOST_MIRRORS)
    # The neutral row (zeros for add_bias, ones for mul_rows) or -1: an op may skip the tokens whose row it is (the
    # CPU native plan does: the caller then need not restrict the step meta to the slots that have the term).
    neutral: int = -1
    memo: dict = field(default_factory=dict, init=False, repr=False)  # a backend's memo of this object (MEMO)


@dataclass(frozen=True, eq=False)
class ScaleShiftPages:
    """DoRA's column scale at one layer: y[t] = y[t] * scale_rows[row[s]] + shift_rows[row[s]] for the tokens of
    slots with flag[s] != 0 (the rows of other slots are never read)."""

    scale_rows: torch.Tensor  # fp32 [N, n]
    shift_rows: torch.Tensor  # fp32 [N, n]
    row: torch.Tensor  # int32 [S] row of each flagged slot (anything for the others)
    flag: torch.Tensor  # int32 [S]; 0 = no DoRA term here
    memo: dict = field(default_factory=dict, init=False, repr=False)  # a backend's memo of this object (MEMO)


@dataclass(frozen=True, eq=False)
class TokenPages:
    """Trainable tokens at one layer (input embedding or output head): slot s replaces the ids
    ids[id_start[s] : id_start[s] + count[s]] by the rows values[start[s] : start[s] + count[s]] (same order)."""

    values: torch.Tensor  # [N, h] replacement rows (the model's dtype)
    ids: torch.Tensor  # int64 [M] replaced ids, distinct within a slot (any stride)
    start: torch.Tensor  # int32 [S] first row of each slot's run in values
    id_start: torch.Tensor  # int32 [S] first entry of each slot's run in ids
    count: torch.Tensor  # int32 [S]; 0 = no trainable tokens here
    max_count: int  # host bound on count[s]


@dataclass(frozen=True, eq=False)
class PackedLoraPages:
    """LoRA of sibling projections that read the same input (q/k/v of one attention, gate/up of one MLP): one
    shrink over each slot's *stack* of A rows, then each member's own expand (vLLM's packed modules, Punica's
    fused shrink).  The stack of slot s is ``a_rows[start[s] : start[s] + rank[s]]``; member m's rows are the
    ``members[m].rank[s]`` rows of it from ``members[m].start[s]`` (its B rows sit at the same row indices of
    ``members[m].b_rows``), so its columns of the shrink ``h = x @ stack.T`` start at
    ``members[m].start[s] - start[s]``::

        h_s   = x[t] @ a_rows[start[s] : start[s] + rank[s]].T                     # [rank[s]], fp32
        y_m[t] += scale_m[s] * h_s[o : o + r_m] @ b_rows_m[start_m[s] : start_m[s] + r_m]   o = start_m[s] - start[s]

    which is ``add_lora(y_m, x, members[m], meta)`` with the shrink shared. Each member's ``a_rows`` is this
    ``a_rows`` (its own run of the stack); a member with rank 0 at a slot reads nothing there."""

    a_rows: torch.Tensor  # [N, in] every member's A rows, each slot's stack consecutive
    start: torch.Tensor  # int32 [S] first row of each slot's stack
    rank: torch.Tensor  # int32 [S] rows of the stack (the sum of the members' ranks); 0 = no LoRA here
    max_rank: int  # host bound on rank[s]
    members: tuple[LoraPages, ...]  # one per sibling, its rows inside the stacks
    host: dict | None = None  # optional live host mirrors of start / rank (HOST_MIRRORS)


TERM_OPS = {"mul_rows": RowPages, "add_lora": LoraPages, "scale_shift_rows": ScaleShiftPages, "add_bias": RowPages}
"""The ops a ``ModuleTerms`` may hold and the pages type each takes."""


@dataclass(frozen=True, eq=False)
class ModuleTerms:
    """One wrapped module's terms of a step in the order they apply to its output ``y``: ``((op, pages), ...)``
    with ``op`` one of TERM_OPS, ``add_lora`` reading the module input ``x``. What a step's bound ops
    (``kernels.step_ops``: ``apply_terms(y, x, terms)``) run as one call where the backend can, and term by term
    otherwise; the same as calling each op in turn. A layer keeps one per set of terms until its storage moves."""

    ops: tuple
    memo: dict = field(default_factory=dict, init=False, repr=False)  # a backend's memo of this object (MEMO)

    def __post_init__(self):
        for item in self.ops:
            if not (isinstance(item, tuple) and len(item) == 2 and item[0] in TERM_OPS
                    and type(item[1]) is TERM_OPS[item[0]]):
                raise ValueError(f"ModuleTerms: expected (op, pages) pairs with op one of {', '.join(TERM_OPS)} and "
                                 f"its pages type, got {item!r:.80}")
