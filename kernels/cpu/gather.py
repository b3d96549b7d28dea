"""Gathers of the CPU backend's gathered and padded plans: copies of each slot's page rows into reused
buffers, the host values of the pages' per-slot indices, and the rank groups that keep a rank-4 token
from paying rank 64 (D3)."""
from __future__ import annotations

import torch

from .._triton import next_pow2
from ..meta import DeltaKernelMeta
from .tensors import WS, f32

SMALL_TABLE = 64
"""Per-slot tables up to this many slots are read whole (``tolist`` of 64 ints ~1 us); larger ones (thousands
of resident deltas) are gathered at the step's active slots first."""


def active_values(pages, name: str, meta: DeltaKernelMeta):
    """slot -> ``pages.<name>[slot]`` as Python numbers for the step's active slots: the pages' live host mirror
    (a list indexed by slot, ``kernels.pages.HOST_MIRRORS``) when it has one, else a dict read from the tensor."""
    host = pages.host
    if host is not None:
        mirror = host.get(name)
        if mirror is not None:
            return mirror
    t = getattr(pages, name)
    active = meta.active_slots_host
    if t.numel() <= SMALL_TABLE:
        vals = t.tolist()
        return {s: vals[s] for s in active}
    return dict(zip(active, t.index_select(0, meta.active_slots).tolist()))


def token_ids(meta: DeltaKernelMeta) -> torch.Tensor | None:
    """Tokens that have a slot, in token order; None when that is every token (no gather needed)."""
    return None if meta.all_tokens_active else meta.active_token_ids


def rank_group(size: int) -> int:
    """The group of a rank (or width): rounded up to a power of two, at least 8."""
    return max(8, next_pow2(size))


def groups(meta: DeltaKernelMeta, sizes: dict[int, int], work: list[int]):
    """(size, token ids or None, token slots, all sizes equal) per group of slots whose rank (or width) rounds
    up to the same power of two (>= 8). A gathered batch pays its largest member's rank, so without groups
    the rank-4 tokens of a batch with a rank-64 slot would pay 16x their FLOPs and bytes (D3). Only tokens
    of ``work`` slots are gathered: a slot without the term here may have no valid rows to read."""
    by_group: dict[int, list[int]] = {}
    for s in work:
        by_group.setdefault(rank_group(sizes[s]), []).append(s)
    by_group = dict(sorted(by_group.items()))
    sl = meta.active_token_slots  # [N]
    if len(by_group) == 1 and len(work) == meta.num_active:
        top = max(sizes[s] for s in work)
        yield top, token_ids(meta), sl, all(sizes[s] == top for s in work)
        return
    group_of = torch.full((int(sl.max()) + 1,), -1, dtype=torch.int64)  # [max slot + 1]; -1: no work here
    for g, members in enumerate(by_group.values()):
        group_of[members] = g
    tok_group = group_of.to(sl.device).index_select(0, sl)  # [N]
    for g, members in enumerate(by_group.values()):
        sub = torch.nonzero(tok_group == g).flatten()  # positions in the active-token list
        ids = sub if meta.all_tokens_active else meta.active_token_ids.index_select(0, sub)
        top = max(sizes[s] for s in members)
        yield top, ids, sl.index_select(0, sub), all(sizes[s] == top for s in members)


def row_index(start: torch.Tensor, size: torch.Tensor, slots: torch.Tensor, rmax: int) -> torch.Tensor:
    """int64 [n, rmax]: rows start[s] + j of each slot in ``slots``, j clamped to the slot's own last row, so a
    gather never reads past a slot's run (rows there may be another tenant's, or NaN); the clamped copies
    are masked to zero by the plans."""
    first = start.index_select(0, slots).long().unsqueeze(1)  # [n, 1]
    last = (size.index_select(0, slots).long() - 1).clamp(min=0).unsqueeze(1)  # [n, 1]
    j = torch.arange(rmax, device=start.device).unsqueeze(0)  # [1, rmax]
    return first + torch.minimum(j, last)  # [n, rmax]


def rows(table: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
    """table[index] as fp32 [*index.shape, K], written into a reused buffer (fresh buffers page-fault, see
    ``tensors.Workspace``)."""
    shape = tuple(index.shape) + (table.shape[1],)
    out = WS.get(name, (index.numel(), table.shape[1]), table.dtype, table.device)
    torch.index_select(table, 0, index.reshape(-1), out=out)
    return f32(out.view(shape))


def check_runs(op: str, what: str, starts: dict[int, int], sizes: dict[int, int], slots: list[int],
               num_rows: int) -> None:
    """A slot's run of rows would leave its row tensor: refused before anything is read."""
    for s in slots:
        a, n = starts[s], sizes[s]
        if a < 0 or a + n > num_rows:
            raise ValueError(f"{op}: slot {s}: {what} {n} from row {a} leaves the {num_rows} rows of the pages")
