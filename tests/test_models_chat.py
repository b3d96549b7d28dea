"""server/models/chat.py and generation.py: the model's chat template and sampling defaults, as transformers reads them."""
from __future__ import annotations

import json

import pytest

from delta_store.errors import FailedPrecondition, InvalidArgument
from gguf_files import TINY_CHAT_TEMPLATE
from server.models.chat import ChatFormat, check_messages, require
from server.models.generation import GenerationDefaults, model_max_len
from server.engine.tokenizer import byte_level_tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer(template=TINY_CHAT_TEMPLATE, extra_special=()):
    tok = byte_level_tokenizer()
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    tok.chat_template = template
    return tok


def test_render_is_apply_chat_template():
    tok = _tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    chat = ChatFormat.from_tokenizer(tok)
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat.render(messages) == list(expected)
    assert tok.decode(chat.render(messages)) == "<|system|>be brief<eos><|user|>héllo<eos><|assistant|>"


def test_end_of_turn_is_the_token_the_template_closes_a_turn_with():
    tok = _tokenizer(CHATML, extra_special=("<|im_start|>", "<|im_end|>"))
    chat = ChatFormat.from_tokenizer(tok, eos_ids=(2,))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end > 2 and chat.end_of_turn_ids == sorted({2, im_end})


def test_a_template_closing_turns_with_plain_text_adds_no_stop_token():
    tok = _tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert ChatFormat.from_tokenizer(tok).end_of_turn_ids == [tok.eos_token_id]


def test_no_template_is_a_failed_precondition():
    assert ChatFormat.from_tokenizer(byte_level_tokenizer()) is None
    with pytest.raises(FailedPrecondition, match="no chat template"):
        require(None)


@pytest.mark.parametrize("messages, needle", [
    ([], "messages is empty"),
    ([{"role": "tool", "content": "x"}], "messages[0].role 'tool' is not one of system, user, assistant"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "messages[1].role 'robot'"),
    ([{"role": "user", "content": ["parts"]}], "messages[0].content must be a string"),
    ([{"content": "no role"}], "messages[0].role None"),
])
def test_bad_messages_are_invalid_arguments(messages, needle):
    with pytest.raises(InvalidArgument) as info:
        ChatFormat.from_tokenizer(_tokenizer()).render(messages)
    assert needle in str(info.value)


def test_check_messages_takes_objects_too():
    class M:
        def __init__(self, role, content):
            self.role, self.content = role, content

    assert check_messages([M("user", "x")]) == [{"role": "user", "content": "x"}]


def test_generation_defaults_take_only_what_the_file_sets(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": [2, 7], "bos_token_id": 1}))
    d = GenerationDefaults.from_folder(tmp_path)
    assert d.sampling_fields() == {"temperature": 0.6, "top_p": 0.95} and d.eos_token_ids == (2, 7)


def test_without_do_sample_the_model_decodes_greedily_as_generate_does():
    d = GenerationDefaults.from_dict({"do_sample": False, "temperature": 0.7, "top_p": 0.5, "max_new_tokens": 9})
    assert d.sampling_fields() == {"temperature": 0.0, "max_new_tokens": 9}  # sampling knobs unused when greedy
    assert GenerationDefaults.from_dict({"eos_token_id": 5}).sampling_fields() == {"temperature": 0.0}
    assert GenerationDefaults.from_dict({"do_sample": True}).sampling_fields() == {}  # sampling, our temperature


def test_no_file_no_defaults(tmp_path):
    assert GenerationDefaults.from_folder(tmp_path) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GenerationDefaults.from_folder(tmp_path)


def test_model_max_len_reads_the_config():
    from transformers import GPT2Config, LlamaConfig

    assert model_max_len(LlamaConfig(max_position_embeddings=8192)) == 8192
    assert model_max_len(GPT2Config(n_positions=1024)) == 1024
