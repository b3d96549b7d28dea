"""DeltaBatch: the one per-step object that tells every wrapped layer which delta slot each token uses (D1).

Built once by ``wrap_model`` and handed to every ``DeltaLinear``/``DeltaNorm`` by reference, so no
``adapter_data`` argument is threaded through the Hugging Face forward and no module global exists
(vLLM ``lora_kernel_metadata.py``, nano-vllm ``utils/context.py``). The per-token slot ids and the
kernels' index tensors (``kernels.MetaBuffers``) live in device buffers allocated once and refilled with
``copy_`` each step, so they keep their addresses from step to step; the kernels' launch grids still
follow each step's counts, so this alone does not make a step CUDA-graph capturable (kernels/meta.py).

Running example: three sequences of lengths [3, 1, 2] using slots [5, -1, 0] give the per-token ids
[5, 5, 5, -1, 0, 0]; ``meta.active_slots_host`` is then [0, 5] and token 3 runs the base model only.

The output head sees only the rows the model runner keeps (``logits_to_keep``, the last token of each
sampled chunk): ``head_rows=[2, 3, 5]`` above gives ``head_meta`` for the head's 3 rows, slots [5, -1, 0],
built on first use (only a head serving trainable tokens asks for it).
"""
from __future__ import annotations

import itertools

import torch

from delta_store.errors import DeltaServeError, InvalidArgument
from kernels import DeltaKernelMeta, MetaBuffers


class DeltaBatch:
    def __init__(self, max_slots: int, device: torch.device | str = "cpu", max_tokens: int = 4096):
        """``max_slots``: the most distinct deltas one step may use (the index buffers' size); slot *numbers*
        may be anything below ``slot_capacity``, which the DeltaModel raises as slots are handed out."""
        if max_slots < 1 or max_tokens < 1:
            raise InvalidArgument(f"DeltaBatch: max_slots ({max_slots}) and max_tokens ({max_tokens}) must be >= 1")
        self.max_slots = int(max_slots)
        self.slot_capacity = 0  # slot numbers [0, slot_capacity) have table entries (DeltaModel.ensure_slots)
        self.device = torch.device(device)
        self._slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=self.device)  # [max_tokens]
        self._index = MetaBuffers(max_tokens, self.max_slots, self.device)
        self.token_slots_host: list[int] = []
        # Before the first prepare() the model is the bare base, so an HF forward outside the engine
        # (generate(), a test) works unchanged.
        self.meta = DeltaKernelMeta.build(self._slots[:0], [], buffers=self._index)
        self._head_rows: list[int] | None = None  # packed indices of the rows the head computes; None = all
        self._head_meta: DeltaKernelMeta | None = None

    @property
    def capacity(self) -> int:
        return int(self._slots.shape[0])

    @property
    def num_tokens(self) -> int:
        return len(self.token_slots_host)

    @property
    def no_delta(self) -> bool:
        return bool(self.meta.no_delta)

    @property
    def head_meta(self) -> DeltaKernelMeta:
        """The kernels' metadata for the output head's rows (``head_rows`` of the last prepare; all tokens if None)."""
        if self._head_rows is None:
            return self.meta
        if self._head_meta is None:
            host = [self.token_slots_host[i] for i in self._head_rows]
            self._head_meta = DeltaKernelMeta.build(torch.tensor(host, dtype=torch.int32, device=self.device), host)
        return self._head_meta

    def prepare(self, token_slots_host: list[int], head_rows: list[int] | None = None) -> None:
        """Refill the per-token slot ids for the next forward: one id per token of the packed batch, -1 = base.

        Called once per step, before ``model(...)``. Only grows the buffer when a step has more tokens
        than any before it (the engine sizes ``max_tokens`` from its token budget, so that never happens
        while serving).
        """
        token_slots_host = list(token_slots_host)
        num_tokens = len(token_slots_host)
        if num_tokens:
            lo, hi = min(token_slots_host), max(token_slots_host)
            if lo < -1 or hi >= self.slot_capacity:
                bad = lo if lo < -1 else hi
                raise InvalidArgument(f"DeltaBatch.prepare: slot id {bad} out of range [-1, {self.slot_capacity})")
        if num_tokens > self.capacity:
            self._slots = torch.full((max(num_tokens, 2 * self.capacity),), -1, dtype=torch.int32, device=self.device)
            self._index = MetaBuffers(self.capacity, self.max_slots, self.device)
        if head_rows is not None and any(not 0 <= i < num_tokens for i in head_rows):
            raise InvalidArgument(f"DeltaBatch.prepare: head_rows {head_rows} outside [0, {num_tokens})")
        view = self._slots[:num_tokens]  # [num_tokens]
        view.copy_(torch.tensor(token_slots_host, dtype=torch.int32))
        self.token_slots_host = token_slots_host
        self.meta = DeltaKernelMeta.build(view, token_slots_host, buffers=self._index)
        self._head_rows, self._head_meta = (None if head_rows is None else list(head_rows)), None

    def prepare_sequences(self, slots: list[int], lengths: list[int], head_rows: list[int] | None = None) -> None:
        """Per-sequence slots of a packed batch -> per-token ids (sequence i contributes ``lengths[i]`` tokens);
        ``head_rows``: the packed token indices whose logits the model computes (``logits_to_keep``)."""
        if len(slots) != len(lengths):
            raise InvalidArgument(f"DeltaBatch.prepare_sequences: {len(slots)} slots for {len(lengths)} sequences")
        if any(n < 0 for n in lengths):
            raise InvalidArgument(f"DeltaBatch.prepare_sequences: negative sequence length in {lengths}")
        self.prepare(list(itertools.chain.from_iterable(itertools.repeat(s, n) for s, n in zip(slots, lengths))),
                     head_rows)

    def reset(self) -> None:
        """Back to "no delta": the next forward runs the bare base whatever its token count."""
        self.prepare([])

    def check_tokens(self, num_tokens: int, where: str) -> None:
        """A layer saw ``num_tokens`` rows while the batch was prepared for another count: a stale batch."""
        if num_tokens != self.num_tokens:
            raise DeltaServeError(f"{where}: DeltaBatch was prepared for {self.num_tokens} tokens but the layer got "
                                  f"{num_tokens}; call batch.prepare(...) before every forward")
