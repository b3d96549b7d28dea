"""DeltaBatch: the one per-step object that tells every wrapped layer which delta slot each token uses (D1).

Built once by ``wrap_model`` and handed to every ``DeltaLinear``/``DeltaNorm`` by reference, so no
``adapter_data`` argument is threaded through the Hugging Face forward and no module global exists
(vLLM ``lora_kernel_metadata.py``, nano-vllm ``utils/context.py``). The per-token slot ids and the
kernels' index tensors (``kernels.MetaBuffers``) live in device buffers allocated once and refilled with
``copy_`` each step, so they keep their addresses from step to step.

Graph mode (``prepare_static``, CUDA graphs: ``server/engine/graphs.py``): the step is padded with -1 tokens to
its bucket, its meta is a *capacity* meta (launch grids sized by the buffers, counts read on the device,
``kernels/meta.py``) and ``static`` is set, which makes every wrapped layer run its fixed op sequence (each term
kind the layer holds, over all of the step's tokens; neutral rows keep the others exact) instead of deciding
per step from host sets which ops to launch. ``prepare`` turns it off again.

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
        self.static = False  # graph mode: the layers run their fixed op sequence (prepare_static)

    @property
    def capacity(self) -> int:
        return int(self._slots.shape[0])

    @property
    def addresses(self) -> tuple[int, int]:
        """Where the slot ids and the index buffers live: a captured graph reads these addresses (they change only
        if a step ever outgrows ``max_tokens``)."""
        return self._slots.data_ptr(), self._index.storage.data_ptr()

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
        self._prepare(list(token_slots_host), head_rows, capacity=False)

    def _prepare(self, token_slots_host: list[int], head_rows: list[int] | None, capacity: bool) -> None:
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
        self.meta = DeltaKernelMeta.build(view, token_slots_host, buffers=self._index, capacity=capacity)
        self._head_rows, self._head_meta = (None if head_rows is None else list(head_rows)), None
        self.static = capacity

    def prepare_static(self, token_slots_host: list[int], bucket: int) -> None:
        """Graph mode: the step's per-token slot ids padded with -1 up to ``bucket`` tokens, refilled in place
        (the slot ids and every index tensor keep their addresses), a capacity meta, and ``static`` set. The
        head computes every row of the bucket (a decode step samples each of its tokens)."""
        token_slots_host = list(token_slots_host)
        if len(token_slots_host) > bucket:
            raise InvalidArgument(f"DeltaBatch.prepare_static: {len(token_slots_host)} tokens exceed the bucket "
                                  f"{bucket}")
        if bucket > self.capacity:
            raise InvalidArgument(f"DeltaBatch.prepare_static: bucket {bucket} exceeds the {self.capacity} "
                                  "preallocated token slots")
        self._prepare(token_slots_host + [-1] * (bucket - len(token_slots_host)), None, capacity=True)

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
