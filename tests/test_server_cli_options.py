"""The CLI's options, in-process against a started server: defaults in --help, --version, the environment
variables, generate --stop/--stop-token/--greedy/--seed, chat, deltas preload, tenants quotas, control
characters made visible on a terminal, and the admin key found through the server's note."""
from __future__ import annotations

import io
import json

import pytest

from server import cli
from server.terminal import TextOut, visible
from server_harness import Served, chat_model_dir, peft_lora, upload


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("cli"), chat_model_dir(tmp_path_factory.mktemp("model")))
    yield s
    s.close()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_shows_defaults_version_and_environment(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    for name in ("DELTASERVE_SERVER", "DELTASERVE_API_KEY", "DELTASERVE_DATA_DIR", "DELTASERVE_KERNELS"):
        assert name in top
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("deltaserve 0.")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    serve = " ".join(capsys.readouterr().out.split())
    assert "default 127.0.0.1:50051" in serve and "default 127.0.0.1:8000" in serve
    assert "smollm2-135m-instruct" in serve and "default info" in serve
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    gen = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1:50051)" in gen and "default: the model's, else 1.0" in gen
    assert "--stop TEXT" in gen and "--stop-token ID" in gen and "--greedy" in gen


def test_visible_escapes_control_characters():
    assert visible("a\x1b[2Jb\x07\n\tc\x7f\x9b") == "a\\x1b[2Jb\\x07\n\tc\\x7f\\x9b"
    assert visible("héllo ✓") == "héllo ✓"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    TextOut(tty).write("x\x1b]0;title\x07")
    TextOut(pipe).write("x\x1b]0;title\x07")
    assert tty.getvalue() == "x\\x1b]0;title\\x07" and pipe.getvalue() == "x\x1b]0;title\x07"


def _json(capsys, srv, *argv) -> dict:
    code, out, err = run(capsys, "generate", "--json", "--server", srv.address, "--api-key", srv.admin_key, *argv)
    assert code == 0, err
    return json.loads(out)


def test_generate_greedy_seed_and_stops(srv, capsys):
    a = _json(capsys, srv, "--greedy", "--max-new-tokens", "12", "--ignore-eos", "hello")
    assert len(a["token_ids"]) == 12 and a["finish_reason"] == "length"
    cut = _json(capsys, srv, "--greedy", "--max-new-tokens", "12", "--ignore-eos", "--stop-token",
                str(a["token_ids"][3]), "hello")
    assert cut["token_ids"] == a["token_ids"][:a["token_ids"].index(a["token_ids"][3]) + 1]
    assert cut["finish_reason"] == "stop"
    if len(a["text"]) >= 6:
        needle = a["text"][3:5]
        by_text = _json(capsys, srv, "--greedy", "--max-new-tokens", "12", "--ignore-eos", "--stop", needle, "hello")
        assert by_text["text"] == a["text"][:a["text"].index(needle)] and by_text["finish_reason"] == "stop"
    s1 = _json(capsys, srv, "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "8", "--ignore-eos", "hello")
    s2 = _json(capsys, srv, "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "8", "--ignore-eos", "hello")
    assert s1["token_ids"] == s2["token_ids"]
    code, _, err = run(capsys, "generate", "--greedy", "--temperature", "0.7", "--server", srv.address, "--api-key",
                       srv.admin_key, "x")
    assert code == 1 and "--greedy and --temperature" in err


def test_chat_one_shot_and_from_stdin(srv, capsys, monkeypatch):
    code, out, err = run(capsys, "chat", "--greedy", "--max-new-tokens", "6", "--system", "be brief", "--server",
                         srv.address, "--api-key", srv.admin_key, "hello there")
    assert code == 0 and out.endswith("\n"), err
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n"))
    code, out2, err = run(capsys, "chat", "--greedy", "--max-new-tokens", "6", "--system", "be brief", "--server",
                          srv.address, "--api-key", srv.admin_key)
    assert code == 0, err
    assert out2.splitlines()[0] == out.splitlines()[0] and len(out2.splitlines()) == 2  # two turns, two answers


def test_chat_with_a_model_without_a_template_is_one_line(tmp_path, capsys):
    import openai

    from server_harness import openai_client

    plain = Served(tmp_path)  # the tiny demo model: a byte-level tokenizer, no chat template
    try:
        code, _, err = run(capsys, "chat", "--server", plain.address, "--api-key", plain.admin_key, "hi")
        with pytest.raises(openai.BadRequestError) as info:  # the same refusal over HTTP: 400 with the reason
            openai_client(plain, plain.admin_key).chat.completions.create(
                model=plain.app.model_name, messages=[{"role": "user", "content": "hi"}])
    finally:
        plain.close()
    assert code == 1 and "FAILED_PRECONDITION" in err and "no chat template" in err and len(err.splitlines()) == 1
    assert info.value.status_code == 400 and "no chat template" in info.value.body["message"]
    assert info.value.body["code"] == "failed_precondition"


def test_deltas_preload_and_tenants_quotas(srv, capsys):
    md = srv.tenant("erin")
    key = md[0][1].removeprefix("Bearer ")
    data, _ = peft_lora(srv.model_dir, seed=2)
    upload(srv, md, "warm", data)
    code, out, err = run(capsys, "deltas", "preload", "warm", "--server", srv.address, "--api-key", key)
    assert code == 0 and out.startswith("preloaded warm@1 tier=device seconds="), err
    code, out, err = run(capsys, "deltas", "preload", "warm@1", "--host", "--server", srv.address, "--api-key", key)
    assert code == 0 and "tier=host" in out, err
    code, out, err = run(capsys, "tenants", "quotas", "erin", "--requests-per-minute", "7", "--max-concurrent", "2",
                         "--server", srv.address, "--api-key", srv.admin_key)
    assert code == 0 and "requests_per_minute=7" in out and "max_concurrent=2" in out, err
    code, out, err = run(capsys, "tenants", "quotas", "erin", "--server", srv.address, "--api-key", srv.admin_key)
    assert code == 0 and out.startswith("tenant=erin ") and "requests_per_minute=7" in out
    code, _, err = run(capsys, "tenants", "quotas", "erin", "--requests-per-minute", "7", "--server", srv.address,
                       "--api-key", key)
    assert code == 1 and "PERMISSION_DENIED" in err


def test_admin_key_is_found_through_the_servers_note(srv, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("DELTASERVE_DATA_DIR", raising=False)
    monkeypatch.delenv("DELTASERVE_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # not the data dir's parent: ./.deltaserve does not exist here
    code, out, err = run(capsys, "tenants", "list", "--server", srv.address)
    assert code == 0 and "admin" in out, err
    code, _, err = run(capsys, "tenants", "list", "--server", "127.0.0.1:1")  # no server, no note
    assert code == 1 and "no API key" in err and ".deltaserve/admin.key" in err


@pytest.mark.parametrize("content, needle", [(b"GGUF" + bytes(range(200)), "corrupt or truncated GGUF file"),
                                             (b"not a model", "not a GGUF file")])
def test_serve_with_a_bad_gguf_is_one_line(tmp_path, capsys, content, needle):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    code, _, err = run(capsys, "serve", "--model", str(bad), "--data-dir", str(tmp_path / "data"))
    assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, err


def test_serve_with_an_unknown_model_name_lists_the_choices(tmp_path, capsys):
    code, _, err = run(capsys, "serve", "--model", "gpt-17", "--data-dir", str(tmp_path / "data"))
    assert code == 1 and "not a built-in model (smollm2-135m-instruct, demo)" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("argv, env", [(["--cuda-graphs"], None), ([], "1"), ([], "maybe")])
def test_serve_cuda_graphs_without_cuda_is_one_line(tmp_path, capsys, monkeypatch, argv, env):
    if env is not None:
        monkeypatch.setenv("DELTASERVE_CUDA_GRAPHS", env)
    code, _, err = run(capsys, "serve", "--data-dir", str(tmp_path / "data"), *argv)
    needle = "DELTASERVE_CUDA_GRAPHS='maybe'" if env == "maybe" else "cuda_graphs needs a CUDA device"
    assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, err
