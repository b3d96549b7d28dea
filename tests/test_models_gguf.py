"""server/models/gguf.py: a GGUF file becomes an HF folder once, exactly, and bad files give one line."""
from __future__ import annotations

import json
import os

import pytest
import torch

from gguf_files import TINY_CHAT_TEMPLATE, tiny_gguf_llama, write_llama_gguf, write_metadata_only_gguf
from server.models import ModelSourceError
from server.models import gguf as gguf_mod
from server.models.gguf import MARKER, ensure_converted, inspect_gguf, sha256_of


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    model = tiny_gguf_llama()
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model)
    return path, model


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_conversion_serves_the_same_weights_tokenizer_and_template(tiny_file, tmp_path):
    from server.engine.tokenizer import byte_level_tokenizer

    path, original = tiny_file
    lines = []
    folder, converted = ensure_converted(path, tmp_path, announce=lines.append)
    assert converted and folder.parent == tmp_path / "models"
    assert folder.name == f"tiny-llama.F32-{sha256_of(path)[:12]}"
    assert len(lines) == 1 and path.name in lines[0] and str(folder) in lines[0] and "\n" not in lines[0]
    marker = json.loads((folder / MARKER).read_text())
    assert marker["sha256"] == sha256_of(path) and marker["model_type"] == "llama" and marker["name"] == "tiny-llama"
    model, tokenizer = _load(folder)
    assert "quantization_config" not in model.config.to_dict()  # an ordinary fp32 safetensors folder
    ids = torch.tensor([[1, 40, 77, 3, 250, 9, 120]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)  # bit for bit: F32 in, fp32 out
    text = "héllo, wörld"
    assert tokenizer(text).input_ids == byte_level_tokenizer()(text).input_ids
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.eos_token == "<eos>"


def test_second_start_reuses_the_folder_without_converting(tiny_file, tmp_path, monkeypatch):
    path, _ = tiny_file
    first, converted = ensure_converted(path, tmp_path, announce=lambda line: None)
    assert converted
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def must_not_run(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_mod, "_convert", must_not_run)
    monkeypatch.setattr(gguf_mod, "inspect_gguf", must_not_run)
    lines = []
    again, converted = ensure_converted(path, tmp_path, announce=lines.append)
    assert (again, converted, lines) == (first, False, [])
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_changed_content_is_converted_again(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", tiny_gguf_llama(seed=1))
    first, _ = ensure_converted(path, tmp_path / "data", announce=lambda line: None)
    write_llama_gguf(path, tiny_gguf_llama(seed=2))  # same name, new weights
    second, converted = ensure_converted(path, tmp_path / "data", announce=lambda line: None)
    assert converted and second != first


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tiny_file, tmp_path, monkeypatch):
    path, _ = tiny_file
    real = gguf_mod._convert

    def dies_half_way(src, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod, "_convert", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ensure_converted(path, tmp_path, announce=lambda line: None)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []  # temp folder removed
    monkeypatch.setattr(gguf_mod, "_convert", real)
    folder, converted = ensure_converted(path, tmp_path, announce=lambda line: None)
    assert converted and (folder / MARKER).is_file()


def test_a_folder_without_its_marker_is_converted_again(tiny_file, tmp_path):
    path, _ = tiny_file
    folder, _ = ensure_converted(path, tmp_path, announce=lambda line: None)
    (folder / MARKER).unlink()  # e.g. written by an older version, or tampered with
    again, converted = ensure_converted(path, tmp_path, announce=lambda line: None)
    assert again == folder and converted and (folder / MARKER).is_file()


def _one_line_error(path, tmp_path) -> str:
    with pytest.raises(ModelSourceError) as info:
        ensure_converted(path, tmp_path / "data", announce=lambda line: pytest.fail(f"announced: {line}"))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_unsupported_architecture_is_one_line(tmp_path):
    message = _one_line_error(write_metadata_only_gguf(tmp_path / "x.gguf", "rwkv-next"), tmp_path)
    assert "architecture rwkv-next is not supported" in message


def test_an_architecture_that_is_not_a_causal_lm_is_refused(tmp_path):
    message = _one_line_error(write_metadata_only_gguf(tmp_path / "enc.gguf", "t5"), tmp_path)
    assert "'t5' is not a causal language model" in message


@pytest.mark.parametrize("cut", [0.002, 0.9])
def test_truncated_file_is_one_line(tiny_file, tmp_path, cut):
    data = tiny_file[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * cut)])
    message = _one_line_error(path, tmp_path)
    assert "corrupt or truncated GGUF file" in message or "GGUF conversion failed" in message
    assert not any(p.is_dir() for p in (tmp_path / "data" / "models").iterdir())


def test_garbage_after_the_magic_is_one_line(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + os.urandom(4096))
    assert "corrupt or truncated GGUF file" in _one_line_error(path, tmp_path)


def test_inspect_reads_metadata_only(tiny_file):
    assert inspect_gguf(tiny_file[0]) == {"model_type": "llama", "name": "tiny-llama"}
