"""ModelRunner: one packed batch in, one sampled token per finished chunk out.

It owns the tensors of a step (the engine holds none): the paged KV cache, the packed ``input_ids`` /
``position_ids`` rows, the per-token delta slots (``dm.batch.prepare_sequences``, the layers' shared
DeltaBatch, D1) and the sampler. The forward is the unchanged HF forward with ``logits_to_keep`` set to the
chunks' last positions, so the ``lm_head`` (2·2048·1024·32000 = 134 of ~320 GFLOP in a 2048-token prefill of
the CPU benchmark model of docs/DESIGN.md) runs only for rows that are sampled. ``execute`` runs in the engine's
worker thread.

Before the step's forward it does the step's KV-prefix work (``prefix_cache.py``, D14): each
:class:`PromptJob` writes a delta's prompt prefix into its shared blocks (a prefix delta's K/V copied in
as they are; a prompt-tuning delta's virtual embeddings run through the model once, positions 0..N-1,
with the delta's slot active so its weight terms apply too), then each :class:`BlockCopy` copies a prefix
tail's few rows into a sequence's own last block.

With ``config.cuda_graphs`` a pure decode step that fits a bucket replays a captured CUDA graph instead
(``graphs.py``); every other step, and every step on the CPU, runs the eager path below unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ServerConfig
from .attention import PagedCache, build_step, use_paged_attention
from .graphs import DecodeGraphs
from .kv_cache import KVCache, kv_layout_for
from .prefix_cache import BlockCopy, PromptJob
from .sampling import SampleRow, sample


@dataclass(slots=True)
class StepInput:
    """A scheduled step as plain lists: decode chunks (1 token) first, then prefill chunks."""

    token_ids: list[int] = field(default_factory=list)  # [T] packed
    positions: list[int] = field(default_factory=list)  # [T] position ids (RoPE / wpe rows)
    starts: list[int] = field(default_factory=list)  # per chunk: first cache slot (virtual slots included)
    lengths: list[int] = field(default_factory=list)  # per chunk: tokens in this step
    block_tables: list[list[int]] = field(default_factory=list)  # per chunk
    slots: list[int] = field(default_factory=list)  # per chunk: delta slot, -1 = base
    sample_at: list[int] = field(default_factory=list)  # packed index of each sampled chunk's last token
    sample_rows: list[SampleRow] = field(default_factory=list)  # one per entry of sample_at
    want_logprobs: bool = False
    want_logits: bool = False  # also return the sampled rows' logits (parity tests)
    prompt_jobs: list[PromptJob] = field(default_factory=list)  # prefixes to compute before the forward
    block_copies: list[BlockCopy] = field(default_factory=list)  # prefix tails to copy, after the jobs

    def add(self, token_ids: list[int], start: int, block_table: list[int], slot: int,
            row: SampleRow | None, position_shift: int = 0) -> None:
        """One chunk: ``token_ids`` at cache slots ``start..``, position ids ``start + position_shift..``
        (``position_shift`` = position_offset - num_virtual: 0 after a PEFT prefix, -N after AdapterHub's)."""
        n = len(token_ids)
        self.token_ids.extend(token_ids)
        self.positions.extend(range(start + position_shift, start + position_shift + n))
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
    logits: torch.Tensor | None = None  # [N, vocab] fp32, when StepInput.want_logits


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
        # config.cuda_graphs (validated: CUDA only): pure decode steps replay graphs captured per bucket
        self.graphs = DecodeGraphs(self) if config.cuda_graphs else None

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
        for job in step.prompt_jobs:
            self._compute_prompt(job)
        for copy in step.block_copies:
            self._copy_rows(copy)
        if not step.token_ids:  # a step that only computed prefixes (a delta made resident while idle)
            return StepResult([], None)
        if self.graphs is not None and self.graphs.fits(step):
            logits = self.graphs.run(step)  # [B, vocab]; None: capture failed, graphs are off, run eagerly
            if logits is not None:
                tokens, logprobs = sample(logits, step.sample_rows, step.want_logprobs)
                return StepResult(tokens, logprobs, logits.float() if step.want_logits else None)
        meta = build_step(self.kv, step.block_tables, step.starts, step.lengths, device)
        self.cache.set_step(meta)
        # a step of prefill chunks that all stop short of their prompt's end still computes one row
        keep_rows = step.sample_at or [len(step.token_ids) - 1]
        if self.dm is not None:  # the head's rows are the kept ones (trainable tokens change their logits)
            layer_slots = [self.dm.layer_slot(s) if s >= 0 else -1 for s in step.slots]
            self.dm.batch.prepare_sequences(layer_slots, step.lengths, head_rows=keep_rows)
        input_ids = torch.tensor([step.token_ids], dtype=torch.long, device=device)  # [1, T]
        position_ids = torch.tensor([step.positions], dtype=torch.long, device=device)  # [1, T]
        keep = torch.tensor(keep_rows, dtype=torch.long, device=device)  # [N]
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=self.cache, use_cache=True,
                         logits_to_keep=keep, paged_step=meta)
        self.cache.set_step(None)
        if not step.sample_at:
            return StepResult([], None)
        logits = out.logits[0]  # [N, vocab]
        tokens, logprobs = sample(logits, step.sample_rows, step.want_logprobs)
        return StepResult(tokens, logprobs, logits.float() if step.want_logits else None)

    def _compute_prompt(self, job: PromptJob) -> None:
        """A delta's N virtual slots into ``job.rows``: K/V copied as they are, or embeddings run through."""
        part = self.dm.prompt_of(job.slot)
        rows = torch.tensor(job.rows, dtype=torch.long, device=self.device)  # [N]
        if part.form == "kv":
            self.kv.k[:, rows] = part.keys  # [L, N, n_kv, head_dim], never rotated
            self.kv.v[:, rows] = part.values
            return
        n = part.num_virtual_tokens
        meta = build_step(self.kv, [job.blocks], [0], [n], self.device)
        self.cache.set_step(meta)
        self.dm.batch.prepare_sequences([self.dm.layer_slot(job.slot)], [n], head_rows=[n - 1])
        positions = torch.arange(n, device=self.device)[None]  # [1, N]: the virtual tokens' own positions
        keep = torch.tensor([n - 1], dtype=torch.long, device=self.device)  # only the cache writes matter
        self.model(inputs_embeds=part.embeddings[None], position_ids=positions, cache=self.cache, use_cache=True,
                   logits_to_keep=keep, paged_step=meta)
        self.cache.set_step(None)

    def _copy_rows(self, copy: BlockCopy) -> None:
        bs = self.kv.block_size
        src = slice(copy.src * bs, copy.src * bs + copy.num_rows)
        dst = slice(copy.dst * bs, copy.dst * bs + copy.num_rows)
        self.kv.k[:, dst] = self.kv.k[:, src]  # [L, rows, n_kv, head_dim]: the tail's rows only
        self.kv.v[:, dst] = self.kv.v[:, src]
