"""Sampling: HF semantics for penalty/temperature/top-k/top-p, exclusion of filtered tokens (statistical),
per-request seeds reproducible whatever the batch companions, and logprobs."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from server.config import ServerConfig
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.sampling import SampleRow, apply_repetition_penalty, filter_top_k_top_p, make_generator, sample
from server.types import GenerationRequest, SamplingParams
from tests.helpers import assert_close, tiny_llama
from tests.engine_helpers import run_engine


def _logits(v: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (10, 0.5), (0, 0.01), (1, 1.0)])
def test_filter_matches_hf_warpers(top_k, top_p):
    logits = _logits()
    got = filter_top_k_top_p(logits, top_k, top_p)
    want = logits[None].clone()
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    assert torch.equal(torch.isinf(got), torch.isinf(want[0]))
    assert torch.equal(got[~torch.isinf(got)], want[0][~torch.isinf(want[0])])


def test_repetition_penalty_matches_hf():
    logits = _logits()
    history = [3, 5, 5, 9, 40, 63]
    got = logits.clone()
    apply_repetition_penalty(got, history, 1.3)
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits[None].clone())[0]
    assert_close(got, want, atol=0, what="repetition penalty")


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (8, 0.5)])
def test_sampling_never_emits_an_excluded_token(top_k, top_p):
    """4000 draws: every draw lies in the allowed set, every allowed token appears, and frequencies follow the
    renormalised probabilities (each within 5 standard deviations)."""
    logits = _logits(seed=3)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, seed=11)
    allowed_logits = filter_top_k_top_p(logits / params.temperature, top_k, top_p)
    allowed = set(torch.nonzero(~torch.isinf(allowed_logits)).flatten().tolist())
    assert 1 < len(allowed) < 20
    gen = make_generator(params)
    n = 4000
    draws, _ = sample(logits[None].expand(n, -1), [SampleRow(params, gen, None)] * n, False)
    counts = torch.bincount(torch.tensor(draws), minlength=logits.numel()).double()
    assert set(torch.nonzero(counts).flatten().tolist()) == allowed
    p = allowed_logits.softmax(-1).double()
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1).all()


def _engine(model, **kw):
    config = ServerConfig(max_batch_tokens=64, max_running=8, kv_block_size=4, kv_blocks=128, max_model_len=96, **kw)
    return Engine(config, ModelRunner(copy.deepcopy(model), None, config))


def test_seeded_sampling_reproducible_whatever_the_companions():
    model = tiny_llama(seed=9)
    target = lambda: GenerationRequest("x", "a", [5, 6, 7, 8, 9], SamplingParams(  # noqa: E731
        max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=1234, ignore_eos=True))
    alone = run_engine(_engine(model), [target()])["x"]
    g = torch.Generator().manual_seed(2)
    companions = [GenerationRequest(f"c{i}", "b", torch.randint(3, 256, (3 + 4 * i,), generator=g).tolist(),
                                    SamplingParams(max_new_tokens=5 + 3 * i, temperature=0.7 * (i % 2), seed=i,
                                                   repetition_penalty=1.2, ignore_eos=True))
                  for i in range(6)]
    crowded = run_engine(_engine(model), companions[:3] + [target()] + companions[3:], per_step=3)["x"]
    assert alone == crowded and len(alone) == 16
    other_seed = target()
    other_seed.sampling.seed = 4321
    assert run_engine(_engine(model), [other_seed])["x"] != alone


def test_logprobs_are_the_model_log_softmax():
    model = tiny_llama(seed=9)
    engine = _engine(model)
    prompt = [4, 8, 15, 16, 23, 42]
    engine.add_request(GenerationRequest("x", "a", prompt, SamplingParams(max_new_tokens=4, temperature=0,
                                                                          logprobs=True, ignore_eos=True)))
    outs = []
    while engine.scheduler.has_work():
        outs += engine.step()
    tokens = [t for o in outs for t in o.token_ids]
    logprobs = [lp for o in outs for lp in o.logprobs]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    want = logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    assert_close(torch.tensor(logprobs), want, atol=1e-4, what="logprobs")
