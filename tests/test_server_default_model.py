"""The embedded default model served for real (SmolLM2-135M-Instruct, converted once per session): it
knows the capital of France, and its greedy chat output equals transformers' ``apply_chat_template`` +
``generate()`` token for token, with and without a delta (the example pirate LoRA, loaded by PEFT)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.client import generate_request
from server_harness import Served

pytestmark = pytest.mark.slow  # a real 135M model on 2 cores: ~1 minute for the module; CI runs it

PIRATE = Path(__file__).resolve().parents[1] / "examples" / "pirate-lora"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "Name a large animal."},
                {"role": "assistant", "content": "An elephant is a large animal."},
                {"role": "user", "content": "Where does it live?"}]
N = 24


@pytest.fixture(scope="module")
def srv(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    (root / "data").mkdir()
    (root / "data" / "models").symlink_to(smollm2.path.parent)  # the session's conversion, found by name
    s = Served(root, smollm2.path, model_path=None, max_model_len=0, delta_memory_bytes=8 << 20, max_rank=16)
    s.md = s.tenant("reader")
    s.client_md = s.client.with_key(s.md[0][1].removeprefix("Bearer "))
    s.client_md.upload("pirate", PIRATE)
    yield s
    s.close()


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2.path))


def _served(srv, prompt, delta="", n=N):
    chunks = list(srv.inference.Generate(generate_request(prompt, delta=delta, max_new_tokens=n, temperature=0.0),
                                         metadata=srv.md))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1]


def _hf_chat(model, tokenizer, messages, n=N) -> list[int]:
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_the_server_uses_the_models_own_limits_and_template(srv):
    app = srv.app
    assert app.config.max_model_len == 8192  # the model's own limit; the 1 GiB CPU KV cache holds ~23k tokens
    assert app.chat is not None and app.chat.end_of_turn_ids == [2]
    assert app.generation_defaults.sampling_fields() == {"temperature": 0.0}  # no do_sample: greedy, as generate()
    assert app.model_name == "SmolLM2-135M-Instruct"


def test_greedy_completion_knows_the_capital_of_france(srv):
    _, text, _ = _served(srv, "The capital of France is", n=8)
    assert "Paris" in text


def test_chat_answers_and_ends_its_turn(srv):
    ids, text, last = _served(srv, QUESTION, n=48)
    assert "Paris" in text and "<|im_end|>" not in text
    assert ids[-1] == 2 and last.finish_reason != 0  # stopped at <|im_end|>, long before 48 tokens


@pytest.mark.parametrize("messages", [QUESTION, CONVERSATION], ids=["question", "conversation"])
def test_chat_parity_with_transformers(srv, hf, messages):
    model, tokenizer = hf
    ids, _, _ = _served(srv, messages)
    assert ids == _hf_chat(model, tokenizer, messages)


def test_chat_parity_with_peft_and_the_example_delta(srv, hf):
    from peft import PeftModel

    model, tokenizer = hf
    pirate = PeftModel.from_pretrained(model, PIRATE).eval()
    try:
        for messages in (QUESTION, CONVERSATION):
            ids, text, last = _served(srv, messages, delta="pirate")
            assert ids == _hf_chat(pirate, tokenizer, messages) and last.delta_version == 1
        assert "Arr" in _served(srv, QUESTION, delta="pirate")[1]  # the style shows
        assert "Arr" not in _served(srv, QUESTION)[1]
    finally:
        pirate.unload()  # give the module's base model back without the adapter
