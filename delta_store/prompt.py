"""The prompt part of a delta: virtual tokens every request of the delta sees in front of its own.

Prompt tuning, P-tuning and prefix tuning do not change a layer's weights; they change the attention
context. Each one puts N virtual slots in front of the request's tokens, in every layer, and every real
token attends to all N slots and causally to the real tokens before it (one softmax over N + t keys).
The libraries differ in what the N slots are and in where the real tokens sit:

* ``embeddings [N, hidden]`` (PEFT prompt tuning, PEFT P-tuning (the prompt encoder's output, evaluated
  at save time), OpenDelta soft prompt): input embeddings of N virtual tokens. They are run through the
  served model once, at positions 0..N-1 (RoPE / GPT-2 ``wpe`` rows), with the delta's own weight terms
  active; the K/V they leave in every layer are the prefix. Their logits are never sampled.
* ``keys / values [L, N, n_kv, head_dim]`` (PEFT prefix tuning, AdapterHub prefix tuning with its MLP
  evaluated at import, OpenDelta prefix): finished per-layer keys and values, used as they are: never
  projected, never rotated (they sit in the KV cache next to the real tokens' keys, which are stored
  after RoPE).

``positions`` says where the request's real tokens sit (the position ids that RoPE or ``wpe`` see):

* ``"after_prefix"``: N, N+1, ... (PEFT: all three kinds; OpenDelta soft prompt). Embeddings always use
  this: the virtual tokens occupy positions 0..N-1 themselves.
* ``"from_zero"``: 0, 1, ... (AdapterHub prefix tuning, OpenDelta prefix: the prefix has no position).

All three libraries lay a flat prefix tensor ``[N, L * 2 * n_kv * head_dim]`` out the same way:
viewed ``[N, 2L, n_kv, head_dim]``, layer i's keys are ``[:, 2i]`` and its values ``[:, 2i + 1]``
(PEFT ``get_prompt``, AdapterHub ``PrefixTuning``, OpenDelta ``ReparameterizeFunction``);
:func:`split_flat_kv` is that one rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DeltaError

POSITIONS = ("after_prefix", "from_zero")
FORMS = ("embeddings", "kv")


@dataclass(slots=True)
class PromptPart:
    embeddings: torch.Tensor | None = None  # [N, hidden]
    keys: torch.Tensor | None = None  # [L, N, n_kv, head_dim]
    values: torch.Tensor | None = None  # [L, N, n_kv, head_dim]
    positions: str = "after_prefix"  # one of POSITIONS

    @property
    def form(self) -> str:
        return "embeddings" if self.embeddings is not None else "kv"

    @property
    def kind(self) -> str:
        """The delta kind this part is: "prompt" (virtual input embeddings) or "prefix" (finished K/V)."""
        return "prompt" if self.form == "embeddings" else "prefix"

    @property
    def num_virtual_tokens(self) -> int:
        if self.embeddings is not None:
            return int(self.embeddings.shape[0])
        return int(self.keys.shape[1]) if self.keys is not None and self.keys.dim() == 4 else 0

    @property
    def position_offset(self) -> int:
        """Position id of the first real token: N for "after_prefix", 0 for "from_zero"."""
        return self.num_virtual_tokens if self.positions == "after_prefix" else 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}`` view (native format, digests, byte counts)."""
        if self.embeddings is not None:
            return {"embeddings": self.embeddings}
        out = {}
        if self.keys is not None:
            out["keys"] = self.keys
        if self.values is not None:
            out["values"] = self.values
        return out

    def check_structure(self) -> None:
        """Exactly one form, a known position policy; shapes are checked against the base in validation."""
        has_kv = self.keys is not None or self.values is not None
        if (self.embeddings is None) == (not has_kv):
            raise DeltaError("prompt part: needs either embeddings or keys and values (exactly one form)")
        if has_kv and (self.keys is None or self.values is None):
            raise DeltaError("prompt part: prefix keys and values must come together")
        if self.positions not in POSITIONS:
            raise DeltaError(f"prompt part: positions {self.positions!r} not one of {POSITIONS}")
        if self.embeddings is not None and self.positions != "after_prefix":
            raise DeltaError("prompt part: virtual input embeddings take positions 0..N-1 themselves, so the real "
                             "tokens must come after them (positions 'after_prefix')")

    def to(self, dtype: torch.dtype) -> "PromptPart":
        def cast(t):
            return None if t is None else t.to(dtype).contiguous()

        return PromptPart(cast(self.embeddings), cast(self.keys), cast(self.values), self.positions)


def split_flat_kv(flat: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int, *,
                  where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, L * 2 * n_kv * head_dim]`` (or its ``N * ...`` flattening) -> keys, values ``[L, N, n_kv, head_dim]``.

    ``where`` names the tensor in the error, with the geometry it was expected to have.
    """
    per_token = num_layers * 2 * num_kv_heads * head_dim
    if flat.dim() == 1 and flat.numel() % per_token == 0 and flat.numel() > 0:
        flat = flat.reshape(-1, per_token)
    if flat.dim() != 2 or flat.shape[1] != per_token or flat.shape[0] < 1:
        raise DeltaError(f"{where}: shape {tuple(flat.shape)}, expected [num_virtual_tokens, {per_token}] = "
                         f"[N, {num_layers} layers x 2 (K, V) x {num_kv_heads} KV heads x head_dim {head_dim}] for "
                         f"the served base")
    n = flat.shape[0]
    kv = flat.reshape(n, num_layers, 2, num_kv_heads, head_dim)  # [N, L, 2, n_kv, hd] == view [N, 2L, n_kv, hd]
    keys = kv[:, :, 0].permute(1, 0, 2, 3).contiguous()  # [L, N, n_kv, hd]
    values = kv[:, :, 1].permute(1, 0, 2, 3).contiguous()
    return keys, values
