"""ModelRunner: one packed batch in, one sampled token per finished chunk out.

It owns the tensors of a step (the engine holds none): the paged KV cache, the packed ``input_ids`` /
``position_ids`` rows, the per-token delta slots (``dm.batch.prepare_sequences``, the layers' shared
DeltaBatch, D1) and the sampler. The forward is the unchanged HF forward with ``logits_to_keep`` set to the
chunks' last positions, so the ``lm_head`` (2·2048·1024·32000 = 134 of ~320 GFLOP in a 2048-token prefill of
the CPU benchmark model of docs/DESIGN.md) runs only for rows that are sampled. ``execute`` runs in the engine's
worker thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ServerConfig
from .attention import PagedCache, build_step, use_paged_attention
from .kv_cache import KVCache, kv_layout_for
from .sampling import SampleRow, sample


@dataclass(slots=True)
class StepInput:
    """A scheduled step as plain lists: decode chunks (1 token) first, then prefill chunks."""

    token_ids: list[int] = field(default_factory=list)  # [T] packed
    positions: list[int] = field(default_factory=list)  # [T]
    starts: list[int] = field(default_factory=list)  # per chunk: first position
    lengths: list[int] = field(default_factory=list)  # per chunk: tokens in this step
    block_tables: list[list[int]] = field(default_factory=list)  # per chunk
    slots: list[int] = field(default_factory=list)  # per chunk: delta slot, -1 = base
    sample_at: list[int] = field(default_factory=list)  # packed index of each sampled chunk's last token
    sample_rows: list[SampleRow] = field(default_factory=list)  # one per entry of sample_at
    want_logprobs: bool = False

    def add(self, token_ids: list[int], start: int, block_table: list[int], slot: int,
            row: SampleRow | None) -> None:
        n = len(token_ids)
        self.token_ids.extend(token_ids)
        self.positions.extend(range(start, start + n))
        self.starts.append(start)
        self.lengths.append(n)
        self.block_tables.append(block_table)
        self.slots.append(slot)
        if row is not None:
            self.sample_at.append(len(self.token_ids) - 1)
            self.sample_rows.append(row)
            self.want_logprobs |= row.params.logprobs


@dataclass(slots=True)
class StepResult:
    token_ids: list[int]  # one per sampled chunk, in StepInput.sample_at order
    logprobs: list[float] | None


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class ModelRunner:
    def __init__(self, dm, tokenizer=None, config: ServerConfig | None = None, *, kv_bytes: int | None = None):
        """dm: a DeltaModel from ``wrap_model`` (``.model``, ``.batch``) or a bare HF model (no deltas).
        ``kv_bytes``: the KV budget (``server/memory.py``; None: resolved here from ``config``); unused when
        ``config.kv_blocks`` is set."""
        config = config or ServerConfig()
        self.config = config
        self.dm = dm if hasattr(dm, "batch") else None
        self.model = dm.model if self.dm is not None else dm
        self.model.eval()
        self.tokenizer = tokenizer
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        use_paged_attention(self.model)
        if kv_bytes is None and not config.kv_blocks:
            from ..memory import resolve

            kv_bytes = resolve(config, self.device).kv_bytes
        layout = kv_layout_for(self.model.config, config.kv_block_size, config.kv_blocks, self.dtype,
                               budget_bytes=kv_bytes or 0)
        self.kv = KVCache(layout, self.dtype, self.device)
        self.cache = PagedCache(self.kv)

    @property
    def eos_token_ids(self) -> set[int]:
        """The model config's EOS id(s), else the tokenizer's: what HF generate() stops on."""
        eos = getattr(self.model.config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepResult:
        device = self.device
        meta = build_step(self.kv, step.block_tables, step.starts, step.lengths, device)
        self.cache.set_step(meta)
        if self.dm is not None:
            self.dm.batch.prepare_sequences(step.slots, step.lengths)
        input_ids = torch.tensor([step.token_ids], dtype=torch.long, device=device)  # [1, T]
        position_ids = torch.tensor([step.positions], dtype=torch.long, device=device)  # [1, T]
        keep = torch.tensor(step.sample_at, dtype=torch.long, device=device)  # [N]
        if not step.sample_at:  # a step of prefill chunks that all stop short of their prompt's end
            keep = torch.tensor([len(step.token_ids) - 1], dtype=torch.long, device=device)
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=self.cache, use_cache=True,
                         logits_to_keep=keep, paged_step=meta)
        self.cache.set_step(None)
        if not step.sample_at:
            return StepResult([], None)
        logits = out.logits[0]  # [N, vocab]
        tokens, logprobs = sample(logits, step.sample_rows, step.want_logprobs)
        return StepResult(tokens, logprobs)
