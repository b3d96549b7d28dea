"""The embedded default, SmolLM2-135M-Instruct: converted from the wheel's GGUF file into a folder
that transformers loads as a real instruct model (its config, chat template and answers)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from server.models import resolve_model

pytestmark = pytest.mark.slow  # the session's one conversion (~45 s); CI runs it


@pytest.fixture(scope="module")
def loaded(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2.path)


def test_converted_folder_is_the_135m_instruct_model(smollm2):
    assert smollm2.origin == "embedded" and smollm2.name == "SmolLM2-135M-Instruct"
    config = json.loads((smollm2.path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"],
            config["max_position_embeddings"]) == ("llama", 30, 576, 49152, 8192)
    assert "quantization_config" not in config
    assert "<|im_start|>" in (smollm2.path / "chat_template.jinja").read_text()


def test_second_resolve_reuses_the_converted_folder(smollm2):
    data_dir = smollm2.path.parent.parent
    t0 = time.monotonic()
    again = resolve_model(None, data_dir, announce=lambda line: pytest.fail(line))
    assert again.path == smollm2.path and not again.converted
    assert time.monotonic() - t0 < 5.0  # one SHA-256 of 98 MB, no conversion (~45 s)


def _greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:]


def test_completion_knows_the_capital_of_france(loaded):
    model, tokenizer = loaded
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert "Paris" in tokenizer.decode(_greedy(model, ids, 8))


def test_chat_template_answers_and_ends_its_turn(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    out = _greedy(model, ids, 24)
    assert "Paris" in tokenizer.decode(out, skip_special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in out.tolist()  # the end-of-turn token
    assert tokenizer.eos_token == "<|im_end|>"


def test_the_model_decodes_greedily_by_default_and_the_turn_ends_at_im_end(smollm2, loaded):
    from server.models.chat import ChatFormat
    from server.models.generation import GenerationDefaults

    defaults = GenerationDefaults.from_folder(smollm2.path)
    # its generation_config.json sets no do_sample: transformers' generate() decodes greedily, and so do we
    assert defaults.sampling_fields() == {"temperature": 0.0} and defaults.eos_token_ids == (2,)
    tokenizer = loaded[1]
    chat = ChatFormat.from_tokenizer(tokenizer, defaults.eos_token_ids)
    assert chat.end_of_turn_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")] == [2]
