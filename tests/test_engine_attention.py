"""The paged-attention bridge: packed, chunked and decode batches through the unchanged HF forward give the
logits of a plain forward, for Llama, Mistral (with its sliding window), Qwen2 and GPT-2.

``server/engine/attention.py`` leans on three behaviours of the pinned transformers (see its docstring); the first
test names them and fails loudly when the version changes, the others fail if any of them stops holding.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.masking_utils import create_causal_mask

from server.engine.attention import ATTN_IMPLEMENTATION, PINNED_TRANSFORMERS, PagedCache, build_step, use_paged_attention
from server.engine.kv_cache import KVCache, kv_layout_for
from tests.helpers import assert_close, tiny_gpt2, tiny_llama

ARCHS = {
    "llama": lambda: tiny_llama(seed=1),
    "mistral": lambda: tiny_llama(seed=2, model_type="mistral"),
    "qwen2": lambda: tiny_llama(seed=3, model_type="qwen2"),
    "gpt2": lambda: tiny_gpt2(seed=4),
}


def test_pinned_transformers_version():
    assert transformers.__version__.startswith(PINNED_TRANSFORMERS), (
        f"transformers {transformers.__version__} is not the pinned {PINNED_TRANSFORMERS}x: re-check what "
        "server/engine/attention.py relies on (cache.update(..., kwargs=) in every attention layer, forward **kwargs "
        "reaching the attention function, create_causal_mask returning None for an attention implementation "
        "without a mask function), then update PINNED_TRANSFORMERS")


class _Packed:
    """Drives a model through PagedCache with explicit per-step chunks."""

    def __init__(self, model, block_size: int = 4, num_blocks: int = 64):
        self.model = model
        use_paged_attention(model)
        self.kv = KVCache(kv_layout_for(model.config, block_size, num_blocks, torch.float32), torch.float32, "cpu")
        self.cache = PagedCache(self.kv)
        self.tables: dict[int, list[int]] = {}

    def step(self, chunks: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """chunks: (sequence id, token ids, start position) with one-token chunks first -> logits per token."""
        tables, starts, lengths, ids, pos = [], [], [], [], []
        for sid, toks, start in chunks:
            table = self.tables.setdefault(sid, [])
            need = (start + len(toks) + self.kv.block_size - 1) // self.kv.block_size - len(table)
            table.extend(self.kv.allocator.allocate(max(0, need)))
            tables.append(table)
            starts.append(start)
            lengths.append(len(toks))
            ids += toks
            pos += range(start, start + len(toks))
        step = build_step(self.kv, tables, starts, lengths, "cpu")
        self.cache.set_step(step)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), cache=self.cache,
                                use_cache=True, paged_step=step).logits[0]
        return list(logits.split(lengths))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_chunked_prefill_and_decode_equal_plain_forward(arch):
    ref = ARCHS[arch]()
    packed = _Packed(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(0)
    seqs = {i: torch.randint(3, 256, (n,), generator=g).tolist() for i, n in enumerate([11, 6, 1, 17])}
    # step 1: seq 2 (one token) in the decode block, seq 0 and 3 partly, seq 1 whole
    got = {i: [] for i in seqs}
    plan = [
        [(2, seqs[2][:1], 0), (0, seqs[0][:5], 0), (1, seqs[1], 0), (3, seqs[3][:9], 0)],
        [(1, [7], 6), (2, [9], 1), (0, seqs[0][5:], 5), (3, seqs[3][9:], 9)],
        [(0, [5], 11), (1, [8], 7), (2, [4], 2), (3, [3], 17)],
    ]
    for chunks in plan:
        for (sid, toks, _), lg in zip(chunks, packed.step(chunks)):
            got[sid].append(lg)
    full = {0: seqs[0] + [5], 1: seqs[1] + [7, 8], 2: seqs[2] + [9, 4], 3: seqs[3] + [3]}
    for sid, toks in full.items():
        with torch.inference_mode():
            want = ref(input_ids=torch.tensor([toks])).logits[0]
        assert_close(torch.cat(got[sid]), want, atol=2e-5, rtol=1e-4, what=f"{arch} sequence {sid}")


def test_mistral_sliding_window_is_applied():
    ref = tiny_llama(seed=2, model_type="mistral")
    ref.config.sliding_window = 5
    packed = _Packed(copy.deepcopy(ref))
    toks = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    first = packed.step([(0, toks[:7], 0)])[0]
    rest = [packed.step([(0, [t], 7 + i)])[0] for i, t in enumerate(toks[7:])]
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([toks])).logits[0]
        full_attention = copy.deepcopy(ref)
        full_attention.config.sliding_window = None
        unwindowed = full_attention(input_ids=torch.tensor([toks])).logits[0]
    assert (want - unwindowed).abs().max() > 1e-3, "window 5 should change 12-token logits"
    assert_close(torch.cat([first, *rest]), want, atol=2e-5, rtol=1e-4, what="mistral sliding window 5")


def test_no_hf_mask_is_built_and_plain_forward_still_works():
    model = tiny_llama(seed=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    packed = _Packed(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    embeds = torch.zeros(1, 4, model.config.hidden_size)
    assert create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=packed.cache,
                              position_ids=torch.arange(4)[None]) is None
    with torch.inference_mode():  # generate()/plain forwards fall back to SDPA
        after = model(input_ids=ids).logits
    assert_close(after, before, atol=1e-6, what="fallback forward")
