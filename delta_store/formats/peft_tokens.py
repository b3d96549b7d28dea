"""PEFT trainable tokens -> replacement rows of the input embedding and the output head (peft 0.21.2).

Two producers write them: ``peft_type: "TRAINABLE_TOKENS"`` (config ``token_indices``; tensor
``<embedding>.trainable_tokens_delta``) and LoRA's ``trainable_token_indices`` (a list for the input
embedding, or ``{module name: indices}``; tensor ``<module>.token_adapter.trainable_tokens_delta``).
Despite the name the tensor holds the new rows themselves: ``TrainableTokensLayer`` writes them with
``W.index_copy(0, indices, delta)``, so they *replace* ``W[indices]``.

Weight tying (``tie_word_embeddings``, GPT-2): PEFT wraps the tied ``lm_head`` with a layer sharing the
embedding's rows, so the logits of those ids become ``h . row`` too. ``TRAINABLE_TOKENS`` files then
also hold an ``lm_head.trainable_tokens_delta`` copy; LoRA files hold only the embedding's, and the head
follows it. A dict naming the head with other indices wraps the two separately (no tying); each then
gets exactly its own rows.
"""
from __future__ import annotations

import re

import torch

from ..base_spec import BaseSpec
from ..delta import RowsTerm
from ..errors import DeltaError
from .builder import DeltaBuilder
from .keys import KeyMapper

_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<mod>.+?)(?:\.token_adapter)?\.trainable_tokens_delta(?:\.[^.]+)?$")


def take_token_rows(tensors: dict[str, torch.Tensor], cfg: dict, peft_type: str, spec: BaseSpec, keys: KeyMapper,
                    builder: DeltaBuilder, where: str) -> None:
    """Move every ``trainable_tokens_delta`` of ``tensors`` into ``builder`` as rows (removing them)."""
    found = {}
    for key in [k for k in tensors if _KEY_RE.match(k[len(_PREFIX):] if k.startswith(_PREFIX) else k)]:
        rel = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        found[_KEY_RE.match(rel).group("mod")] = (key, tensors.pop(key))
    indices = cfg.get("token_indices") if peft_type == "TRAINABLE_TOKENS" else cfg.get("trainable_token_indices")
    if not found:
        if indices:
            raise DeltaError(f"{where}: the config names trainable token indices {indices} but the file holds no "
                             f"trainable_tokens_delta rows")
        return
    if not indices:
        raise DeltaError(f"{where}: tensor {next(iter(found.values()))[0]!r} holds trainable-token rows but the "
                         f"config names no token indices")
    rows: dict[str, RowsTerm] = {}
    for mod, (key, values) in found.items():
        info = keys.module(mod, key=key)
        ids = _indices_for(indices, mod, where, key)
        if values.dim() != 2 or values.shape[0] != len(ids):
            raise DeltaError(f"{where}: {key!r}: {len(ids)} token indices {ids} but rows of shape "
                             f"{tuple(values.shape)}")
        rows[info.path] = RowsTerm(torch.tensor(ids, dtype=torch.int64), values.contiguous())
    head, emb = spec.output_head, spec.input_embedding
    if spec.tied_embeddings and emb in rows and head and head not in rows:
        rows[head] = RowsTerm(rows[emb].index.clone(), rows[emb].values)  # the tied head follows the embedding
    for path, term in rows.items():
        builder.rows(spec.modules[path], term, key=found.get(path, ("", None))[0] or path)


def _indices_for(indices, mod: str, where: str, key: str) -> list[int]:
    """The indices a module's rows use: the list, or the dict entry whose name ends its path (PEFT matches so)."""
    if isinstance(indices, dict):
        hits = [name for name in indices if mod == name or mod.endswith("." + name) or mod.endswith(name)]
        if len(hits) != 1:
            raise DeltaError(f"{where}: {key!r}: trainable_token_indices names {sorted(indices)}, of which "
                             f"{len(hits)} match module {mod!r}")
        ids = indices[hits[0]]
    else:
        ids = indices
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DeltaError(f"{where}: trainable token indices must be a list of integers, found {ids!r}")
    return ids
