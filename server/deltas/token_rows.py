"""TokenRowsPool and the two wrappers that serve trainable tokens: DeltaEmbedding and DeltaHead.

PEFT's trainable tokens replace rows of the ``[vocab, hidden]`` embedding; with tied embeddings the
output head uses the same rows (``delta_store/delta.py``, ``RowsTerm``). Each slot holds up to
``max_rows`` replaced ids and their rows; pools are allocated on the first trainable-token delta, so a
server that never sees one holds nothing for them::

    index  [S, R] int64 (-1 past count)   values [S, R, hidden]   count [S] int32

bytes: ``S * R * (8 + hidden * e) + 4 S``; e.g. S=32, R=64, hidden 4096, bf16: 16.8 MB per module.

* ``DeltaEmbedding`` (the input embedding): ``y = base(ids)``, then ``kernels.replace_rows`` gives each
  token of a slot with rows the row of its id when its id is one of them.
* ``DeltaHead`` (the output head): ``logits = base(h)``, then ``kernels.head_rows`` sets the logits of a
  slot's replaced ids to ``h . row``. The head sees only the rows the model runner keeps
  (``logits_to_keep``), so it reads ``DeltaBatch.head_meta``, built for those rows.
Both are free when no active slot has rows: a host-side flag per slot, no device sync.
"""
from __future__ import annotations

import torch

import kernels
from delta_store.delta import ModuleDelta
from delta_store.errors import DeltaError, DeltaServeError

from .batch import DeltaBatch


class TokenRowsPool(torch.nn.Module):
    def __init__(self, max_slots: int, max_rows: int, hidden: int, device, dtype):
        super().__init__()
        S, R = max_slots, max_rows
        self.max_rows, self.hidden = R, hidden
        self.register_buffer("index", torch.full((S, R), -1, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(S, R, hidden, device=device, dtype=dtype), persistent=False)
        self.register_buffer("count", torch.zeros(S, dtype=torch.int32, device=device), persistent=False)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.inference_mode()
    def set(self, slot: int, index: torch.Tensor, values: torch.Tensor) -> None:
        self.clear(slot)
        n = int(index.numel())
        self.index[slot, :n].copy_(index)
        self.values[slot, :n].copy_(values)
        self.count[slot] = n

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        self.index[slot].fill_(-1)
        self.values[slot].zero_()
        self.count[slot] = 0


class _RowsWrapper(torch.nn.Module):
    """What DeltaEmbedding and DeltaHead share: the pool, the checks and the load path."""

    def __init__(self, base: torch.nn.Module, batch: DeltaBatch, *, path: str, max_slots: int, max_rows: int,
                 vocab: int, hidden: int):
        super().__init__()
        self.base, self.batch, self.path = base, batch, path
        self.max_slots, self.max_rows, self.vocab, self.hidden = max_slots, max_rows, vocab, hidden
        self.rows: TokenRowsPool | None = None  # allocated on the first trainable-token delta (load path)
        self.has = [False] * max_slots

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def nbytes(self) -> int:
        return self.rows.nbytes() if self.rows is not None else 0

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

    def _pool(self) -> TokenRowsPool:
        if self.rows is None:
            w = self.base.weight
            self.rows = TokenRowsPool(self.max_slots, self.max_rows, self.hidden, w.device, w.dtype)
        return self.rows

    @torch.inference_mode()
    def set_delta(self, slot: int, md: ModuleDelta) -> None:
        self.check(md)
        self._pool().set(slot, md.rows.index, md.rows.values)
        self.has[slot] = True

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        if self.rows is not None:
            self.rows.clear(slot)
        self.has[slot] = False

    def _active(self, meta) -> bool:
        return not meta.no_delta and any(self.has[s] for s in meta.active_slots_host)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, hidden={self.hidden}, max_rows={self.max_rows}"


class DeltaEmbedding(_RowsWrapper):
    @classmethod
    def from_layer(cls, layer: torch.nn.Embedding, batch: DeltaBatch, *, path: str, max_slots: int,
                   max_rows: int) -> "DeltaEmbedding":
        return cls(layer, batch, path=path, max_slots=max_slots, max_rows=max_rows, vocab=layer.num_embeddings,
                   hidden=layer.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # a fresh [..., hidden] tensor
        meta = self.batch.meta
        if not self._active(meta):
            return y
        y2 = y.view(-1, self.hidden)  # [num_tokens, hidden]
        self.batch.check_tokens(y2.shape[0], self.path)
        pool = self.rows
        kernels.replace_rows(y2, ids.reshape(-1), pool.index, pool.values, pool.count, meta)
        return y


class DeltaHead(_RowsWrapper):
    @classmethod
    def from_layer(cls, layer: torch.nn.Linear, batch: DeltaBatch, *, path: str, max_slots: int,
                   max_rows: int) -> "DeltaHead":
        return cls(layer, batch, path=path, max_slots=max_slots, max_rows=max_rows, vocab=layer.out_features,
                   hidden=layer.in_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)  # [..., vocab]
        meta = self.batch.head_meta
        if not self._active(meta):
            return logits
        l2 = logits.view(-1, self.vocab)  # [kept rows, vocab]
        if l2.shape[0] != meta.num_tokens:
            raise DeltaServeError(f"{self.path}: the head got {l2.shape[0]} rows but the batch was prepared for "
                             f"{meta.num_tokens} head rows; pass head_rows to prepare_sequences")
        pool = self.rows
        kernels.head_rows(l2, h.reshape(-1, self.hidden).contiguous(), pool.index, pool.values, pool.count, meta)
        return logits
