"""DeltaEmbedding and DeltaHead: the two wrappers that serve trainable tokens, paged like every other term (D13).

PEFT's trainable tokens replace rows of the ``[vocab, hidden]`` embedding; with tied embeddings the
output head uses the same rows (``delta_store/delta.py``, ``RowsTerm``). A delta replacing n ids holds,
per wrapped module, n rows of its ``values`` arena (the model's dtype) and n entries of its int64 ``ids``
arena: ``n * (hidden * e + 8)`` bytes (bucketed, at most 1.25x), nothing until the first such delta.
``max_token_rows`` is a validation limit, not a storage size. The kernels read both through the slot's
first rows (``kernels.TokenPages``).

* ``DeltaEmbedding`` (the input embedding): ``y = base(ids)``, then ``kernels.replace_rows`` gives each
  token of a slot with rows the row of its id when its id is one of them.
* ``DeltaHead`` (the output head): ``logits = base(h)``, then ``kernels.head_rows`` sets the logits of a
  slot's replaced ids to ``h . row``. The head sees only the rows the model runner keeps
  (``logits_to_keep``), so it reads ``DeltaBatch.head_meta``, built for those rows.
Both are free when no active slot has rows: a host-side set of slots, no device sync.
"""
from __future__ import annotations

from collections import Counter

import torch

import kernels
from delta_store.delta import ModuleDelta
from delta_store.errors import DeltaError, DeltaServeError

from .batch import DeltaBatch
from .pages import RowArena
from .slot_fields import SlotFields
from .terms import Staged, TermRows, TermSpec, align

TERMS = {"token_values": TermSpec("values", "tok_start"), "token_ids": TermSpec("ids", "tok_id_start")}


class _RowsWrapper(torch.nn.Module):
    """What DeltaEmbedding and DeltaHead share: the arenas, the checks and the load path."""

    def __init__(self, base: torch.nn.Module, batch: DeltaBatch, *, path: str, max_rows: int, vocab: int,
                 hidden: int):
        super().__init__()
        self.base, self.batch, self.path = base, batch, path
        self.max_rows, self.vocab, self.hidden = max_rows, vocab, hidden  # max_rows: a validation limit
        w = base.weight
        arenas = {"values": RowArena(align(hidden, w.dtype), w.dtype, w.device),
                  "ids": RowArena(1, torch.int64, w.device)}
        self.rows = TermRows(arenas, TERMS, SlotFields({"tok_start": 0, "tok_id_start": 0, "tok_count": 0}, {},
                                                       w.device))
        self.has: set[int] = set()
        self._counts: Counter = Counter()
        self._pages = None  # (key, TokenPages)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def nbytes(self) -> int:
        return self.rows.capacity_bytes

    def check(self, md: ModuleDelta) -> None:
        if md.kinds() != {"tokens"}:
            raise DeltaError(f"{self.path}: only trainable-token rows are served here, found {sorted(md.kinds())}")
        n = md.rows.count
        if n > self.max_rows:
            raise DeltaError(f"{self.path}: {n} trainable-token rows exceed the server's max_token_rows "
                             f"{self.max_rows}")
        if tuple(md.rows.values.shape) != (n, self.hidden):
            raise DeltaError(f"{self.path}: rows.values expected shape ({n}, {self.hidden}), found "
                             f"{tuple(md.rows.values.shape)}")
        if n and (int(md.rows.index.min()) < 0 or int(md.rows.index.max()) >= self.vocab):
            raise DeltaError(f"{self.path}: a token index is outside the vocabulary [0, {self.vocab})")

    @staticmethod
    def term_rows(md: ModuleDelta) -> dict[str, int]:
        n = md.rows.count if md.rows is not None else 0
        return {"token_values": n, "token_ids": n} if n else {}

    def stage(self, md: ModuleDelta, pin: bool = False) -> Staged:
        """The replaced ids and rows on the host (pinned when ``pin``); a delta of 0 rows stages nothing."""
        self.check(md)
        n = md.rows.count
        if not n:
            return Staged({}, {}, set())
        rows = {"token_values": md.rows.values.to(self.base.weight.dtype).contiguous(),  # [n, hidden]
                "token_ids": md.rows.index.to(torch.int64).reshape(n, 1)}  # [n, 1]
        if pin:
            rows = {k: v.pin_memory() for k, v in rows.items()}
        return Staged(rows, {"tok_count": n}, {"tokens"})

    # ---- the step loop's writes (between forwards) -------------------------------------------
    def place(self, slot: int, staged: Staged, capacity: int) -> None:
        self.clear(slot, keep_neutrals=True)
        if not staged.rows:
            return
        self.rows.place(slot, staged.rows, capacity, **staged.values)
        self.has.add(slot)
        self._counts[staged.values["tok_count"]] += 1

    def clear(self, slot: int, *, keep_neutrals: bool = False) -> None:
        if slot not in self.rows.cells:
            return
        if slot in self.has:
            self.has.discard(slot)
            n = self.rows.fields.host["tok_count"][slot]
            self._counts[n] -= 1
            if self._counts[n] <= 0:
                del self._counts[n]
        self.rows.clear(slot, keep_neutrals=keep_neutrals)

    # ---- step path ---------------------------------------------------------------------------
    def token_pages(self) -> kernels.TokenPages:
        r, f = self.rows, self.rows.fields
        bound = max(self._counts, default=0)
        key = (r.arenas["values"].version, r.arenas["ids"].version, f.version, bound)
        if self._pages is None or self._pages[0] != key:
            pages = kernels.TokenPages(r.arenas["values"].rows[:, :self.hidden], r.arenas["ids"].rows[:, 0],
                                       f.view("tok_start"), f.view("tok_id_start"), f.view("tok_count"), bound)
            self._pages = (key, pages)
        return self._pages[1]

    def _active(self, meta) -> bool:
        if self.batch.static:  # graph mode: the op runs whenever a slot has rows here (count 0 for the others)
            return bool(self.has)
        return not meta.no_delta and bool(self.has) and any(s in self.has for s in meta.active_slots_host)

    def static_plan(self) -> tuple:
        """Graph mode (``DeltaLinear.static_plan``): whether the op runs, its count bound, the storage versions."""
        r = self.rows
        return (bool(self.has), max(self._counts, default=0), tuple(a.version for a in r.arenas.values()),
                r.fields.version)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, hidden={self.hidden}, max_rows={self.max_rows}"


class DeltaEmbedding(_RowsWrapper):
    @classmethod
    def from_layer(cls, layer: torch.nn.Embedding, batch: DeltaBatch, *, path: str,
                   max_rows: int) -> "DeltaEmbedding":
        return cls(layer, batch, path=path, max_rows=max_rows, vocab=layer.num_embeddings, hidden=layer.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # a fresh [..., hidden] tensor
        meta = self.batch.meta
        if not self._active(meta):
            return y
        y2 = y.view(-1, self.hidden)  # [num_tokens, hidden]
        self.batch.check_tokens(y2.shape[0], self.path)
        kernels.replace_rows(y2, ids.reshape(-1), self.token_pages(), meta)
        return y


class DeltaHead(_RowsWrapper):
    @classmethod
    def from_layer(cls, layer: torch.nn.Linear, batch: DeltaBatch, *, path: str, max_rows: int) -> "DeltaHead":
        return cls(layer, batch, path=path, max_rows=max_rows, vocab=layer.out_features, hidden=layer.in_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)  # [..., vocab]
        if not self.has:  # no resident delta has head rows: skip building the head rows' meta (one per step)
            return logits
        meta = self.batch.head_meta
        if not self._active(meta):
            return logits
        l2 = logits.view(-1, self.vocab)  # [kept rows, vocab]
        if l2.shape[0] != meta.num_tokens:
            raise DeltaServeError(f"{self.path}: the head got {l2.shape[0]} rows but the batch was prepared for "
                                  f"{meta.num_tokens} head rows; pass head_rows to prepare_sequences")
        kernels.head_rows(l2, h.reshape(-1, self.hidden).contiguous(), self.token_pages(), meta)
        return logits
