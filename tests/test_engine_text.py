"""Byte-level tokenizer, incremental detokenisation that never splits a multi-byte character, stop strings."""
from __future__ import annotations

import copy

import pytest

from server.config import ServerConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.tokenizer import VOCAB_SIZE, byte_level_tokenizer
from server.types import FinishReason, GenerationRequest, SamplingParams
from tests.helpers import tiny_llama

TEXT = "naïve café — 日本語 🎉👍 done"


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def test_byte_tokenizer_roundtrip_and_ids(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT.encode("utf-8"))
    assert ids == [3 + b for b in TEXT.encode("utf-8")]
    assert tok.decode(ids) == TEXT
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, VOCAB_SIZE)
    assert tok.decode([1, *ids, 2], skip_special_tokens=True) == TEXT


def test_streamed_text_never_splits_a_character(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt_ids=tok.encode("prompt ", add_special_tokens=False))
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert "🎉" in pieces and "日" in pieces  # 4- and 3-byte characters arrive whole, once complete
    # a 4-byte emoji's first three bytes emit nothing
    d = IncrementalDetokenizer(tok)
    emoji = tok.encode("🎉", add_special_tokens=False)
    assert [d.push([i]) for i in emoji] == ["", "", "", "🎉"]


def test_stop_string_held_back_and_cut(tok):
    d = IncrementalDetokenizer(tok, stop_strings=["STOP", "日本"])
    out = []
    for i in tok.encode("ab ST x STOP tail", add_special_tokens=False):
        out.append(d.push([i]))
        if d.stopped:
            break
    assert "".join(out) == "ab ST x " and d.stopped
    assert "S" not in "".join(out[:4])  # "ab S" arrived but "S" was held while it could start "STOP"
    d = IncrementalDetokenizer(tok, stop_strings=["日本"])
    text = "".join(d.push([i]) for i in tok.encode("x日本y", add_special_tokens=False))
    assert text == "x" and d.stopped


def test_engine_streams_text_and_honours_stop_strings(tok):
    model = tiny_llama(seed=4, vocab=VOCAB_SIZE)
    config = ServerConfig(max_batch_tokens=64, max_running=4, kv_block_size=4, kv_blocks=64, max_model_len=96)
    engine = Engine(config, ModelRunner(copy.deepcopy(model), tok, config))
    prompt = tok.encode("hello", add_special_tokens=False)
    engine.add_request(GenerationRequest("free", "a", prompt, SamplingParams(max_new_tokens=24, temperature=0,
                                                                            ignore_eos=True)))
    outs = []
    while engine.scheduler.has_work():
        outs += engine.step()
    ids = [t for o in outs for t in o.token_ids]
    text = "".join(o.text for o in outs)
    assert text == tok.decode(ids, skip_special_tokens=True)
    # stop on a substring of what the model produces anyway: output ends right before it
    visible = text.replace("\ufffd", "")
    assert len(visible) >= 7, f"seeded model produced too little printable text: {text!r}"
    stop = visible[5:7]
    engine.add_request(GenerationRequest("stop", "a", prompt, SamplingParams(max_new_tokens=24, temperature=0,
                                                                            ignore_eos=True, stop_strings=[stop])))
    outs = []
    while engine.scheduler.has_work():
        outs += engine.step()
    assert outs[-1].finish_reason == FinishReason.STOP
    streamed = "".join(o.text for o in outs)
    assert stop not in streamed and text.startswith(streamed) and len(streamed) < len(text)
    assert engine.runner.kv.allocator.num_used == 0
