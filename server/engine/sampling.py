"""Next-token choice for a batch of sequences, each with its own SamplingParams.

Order and semantics follow HF ``generate``'s logits processors so a request means the same thing here:
repetition penalty (divide positive logits, multiply negative ones, over prompt + output ids), temperature,
top-k, top-p (keep the smallest set of tokens whose probability reaches ``top_p``), then a draw.

Reproducibility: every sampled request owns a ``torch.Generator`` seeded with its seed (or a random one), and
draws exactly one ``multinomial`` sample per generated token from it. Its draws therefore depend only on its
own logits, never on which other requests share the batch (vLLM's per-request generators do the same).
Greedy rows of the whole batch are one ``argmax``: with 32 rows, a per-row Python loop would cost ~0.3 ms
per step for nothing.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(1 << 63)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(slots=True)
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    history: list[int] | None  # prompt + output ids, only when repetition_penalty != 1


def apply_repetition_penalty(logits: torch.Tensor, ids: list[int], penalty: float) -> None:
    """logits [V] in place, HF RepetitionPenaltyLogitsProcessor semantics."""
    idx = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
    vals = logits.index_select(0, idx)
    logits.index_copy_(0, idx, torch.where(vals > 0, vals / penalty, vals * penalty))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits with excluded tokens at -inf (a new tensor)."""
    out = logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p; the first token always stays
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample(logits: torch.Tensor, rows: list[SampleRow], want_logprobs: bool) -> tuple[list[int], list[float] | None]:
    """logits [N, V] (one row per sequence to sample) -> (token ids [N], logprobs of the chosen tokens or None).

    Logprobs are those of the model's raw distribution (before penalty, temperature and filtering), as the
    OpenAI API and vLLM report them.
    """
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # [N, V]
    penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            apply_repetition_penalty(logits[i], rows[i].history, rows[i].params.repetition_penalty)
    tokens = logits.argmax(dim=-1)  # [N] greedy choice for every row; sampled rows overwrite theirs
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        tokens = tokens.clone()
        for i in sampled:
            p = rows[i].params
            row = filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
            probs = row.softmax(-1)
            tokens[i] = torch.multinomial(probs, 1, generator=rows[i].generator)[0]
    token_list = tokens.tolist()
    logprobs = None
    if raw_logprobs is not None:
        logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    return token_list, logprobs
