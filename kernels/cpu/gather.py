"""Gathers of the CPU backend's gathered and padded plans: per-token (or per-slot) copies of pool rows
into reused buffers, and the rank groups that keep a rank-4 token from paying rank 64 (D3)."""
from __future__ import annotations

import torch

from .._triton import next_pow2
from ..meta import DeltaKernelMeta
from .tensors import WS, f32


def token_ids(meta: DeltaKernelMeta) -> torch.Tensor | None:
    """Tokens that have a slot, in token order; None when that is every token (no gather needed)."""
    return None if meta.all_tokens_active else meta.active_token_ids


def rank_group(size: int) -> int:
    """The group of a rank (or width): rounded up to a power of two, at least 8."""
    return max(8, next_pow2(size))


def groups(meta: DeltaKernelMeta, sizes: list[int], work: list[int]):
    """(size, token ids or None, token slots, all sizes equal) per group of slots whose rank (or width) rounds
    up to the same power of two (>= 8). A gathered batch pays its largest member's rank, so without groups
    the rank-4 tokens of a batch with a rank-64 slot would pay 16x their FLOPs and bytes (D3)."""
    by_group: dict[int, list[int]] = {}
    for s in work:
        by_group.setdefault(rank_group(sizes[s]), []).append(s)
    by_group = dict(sorted(by_group.items()))
    sl = meta.active_token_slots  # [N]
    if len(by_group) == 1:
        # tokens of slots without work here (size 0) stay in the batch, masked by their size
        top = max(sizes[s] for s in work)
        yield top, token_ids(meta), sl, all(sizes[s] == top for s in meta.active_slots_host)
        return
    group_of = torch.full((len(sizes),), -1, dtype=torch.int64)  # [S]; -1: no work at this layer
    for g, members in enumerate(by_group.values()):
        group_of[members] = g
    tok_group = group_of.to(sl.device).index_select(0, sl)  # [N]
    for g, members in enumerate(by_group.values()):
        sub = torch.nonzero(tok_group == g).flatten()  # positions in the active-token list
        ids = sub if meta.all_tokens_active else meta.active_token_ids.index_select(0, sub)
        top = max(sizes[s] for s in members)
        yield top, ids, sl.index_select(0, sub), all(sizes[s] == top for s in members)


def rows(pool: torch.Tensor, slots: torch.Tensor, name: str) -> torch.Tensor:
    """pool[slots] as fp32, written into a reused buffer (fresh buffers page-fault, see ``tensors.Workspace``)."""
    shape = (slots.numel(),) + tuple(pool.shape[1:])
    out = WS.get(name, shape, pool.dtype, pool.device)
    torch.index_select(pool, 0, slots, out=out)
    return f32(out)


def up_rows(pool: torch.Tensor, size: int, slots: torch.Tensor, name: str) -> torch.Tensor:
    """pool[slots, :, :size].transpose(1, 2) as fp32 [n, size, out], for ``pool`` [S, out, R] stored either
    way. Stored [S, out, R] (contiguous), the gather copies out*n runs of ``size`` elements: 0.16x of a
    1024x1024 base matmul at n=32, size=16, 1 thread; stored [S, R, out] (``pool`` a transpose view), it
    copies n blocks of size*out contiguous elements: 0.025x."""
    if pool.stride(1) == 1 and pool.shape[1] > 1:  # transposed storage: rows of the [S, R, out] tensor
        return rows(pool.transpose(1, 2)[:, :size], slots, name)
    return rows(pool[:, :, :size], slots, name).transpose(1, 2)


def check_limit(op: str, what: str, values: list[int], slots: list[int], limit: int) -> None:
    """A slot's rank (or width) beyond the pool's padded size: refused before any pool is sliced."""
    worst = max(slots, key=lambda s: values[s])
    if values[worst] > limit:
        raise ValueError(f"{op}: {what}[{worst}] = {values[worst]} exceeds the pool's padded size {limit}")
