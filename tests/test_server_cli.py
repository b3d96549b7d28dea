"""The CLI driven as a user would: `serve` in a subprocess on the demo model, then `tenants create`,
`upload` (a PEFT folder), `generate --json`, `deltas list`, an error, and SIGTERM. Exit codes and outputs checked."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, env: dict):
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--model", "demo", "--data-dir", str(data_dir), "--listen",
             self.address, "--metrics-listen", "127.0.0.1:0", "--openai-listen", "127.0.0.1:0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True).start()
        deadline = time.monotonic() + 180
        while not any("admin key file" in line for line in self.stdout):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start (rc {self.proc.poll()}): {self.stdout} {self.stderr[-5:]}")
            time.sleep(0.05)

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.append(line.rstrip("\n"))


def cli(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    e = dict(os.environ, PYTHONPATH=str(ROOT), DELTASERVE_DATA_DIR=str(data_dir))
    e.pop("DELTASERVE_API_KEY", None)
    return e, data_dir


def test_cli_walkthrough(env, tmp_path):
    e, data_dir = env
    server = Server(data_dir, e)
    e = dict(e, DELTASERVE_SERVER=server.address)
    try:
        out = "\n".join(server.stdout)
        assert f"deltaserve listening on {server.address}" in out and "metrics: http://127.0.0.1:" in out
        key_file = data_dir / "admin.key"
        assert f"admin key file: {key_file}" in out
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

        # the admin key is found in the default data dir for a local server: no --api-key needed
        r = cli(e, "tenants", "create", "alice")
        assert r.returncode == 0, r.stderr
        alice_key = r.stdout.split("api_key=")[1].strip()
        assert r.stdout.startswith("tenant=alice ") and alice_key.startswith("ds_")
        r = cli(e, "tenants", "list")
        assert r.returncode == 0 and "alice" in r.stdout and "admin" in r.stdout

        # a PEFT LoRA made for the demo model, uploaded as a folder
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(data_dir / "demo-model", dtype=torch.float32).eval()
        torch.manual_seed(0)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        folder = tmp_path / "adapter"
        peft_model.save_pretrained(folder)
        r = cli(e, "upload", str(folder), "--name", "style", "--api-key", alice_key)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("name=style version=1 digest=") and len(r.stdout.split("digest=")[1].strip()) == 64
        assert "upload style:" in r.stderr and "100%" in r.stderr

        r = cli(e, "generate", "--json", "--temperature", "0", "--max-new-tokens", "8", "--delta", "style",
                "--api-key", alice_key, "hello")
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert {"text", "token_ids", "finish_reason", "usage"} <= set(reply)
        assert reply["finish_reason"] in ("length", "eos") and reply["delta_version"] == 1
        assert reply["usage"]["completion_tokens"] == len(reply["token_ids"]) <= 8
        assert reply["usage"]["prompt_tokens"] == 5
        merged = peft_model.merge_and_unload().eval()
        ids = torch.tensor([[3 + b for b in b"hello"]])
        expected = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(merged(ids).logits[0, -1].argmax())
                expected.append(nxt)
                if nxt == 2:  # eos
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert reply["token_ids"] == expected

        r = cli(e, "generate", "--temperature", "0", "--max-new-tokens", "4", "--api-key", alice_key, "hi")
        assert r.returncode == 0 and r.stdout.endswith("\n"), r.stderr

        r = cli(e, "deltas", "list", "--api-key", alice_key)
        assert r.returncode == 0 and "style" in r.stdout and "lora" in r.stdout, r.stdout
        r = cli(e, "deltas", "show", "style", "--api-key", alice_key)
        assert r.returncode == 0 and "version=1" in r.stdout and "requests=1" in r.stdout, r.stdout
        # a merge of one part at weight 1 is that delta itself (and counts as a request on it)
        r = cli(e, "generate", "--json", "--temperature", "0", "--max-new-tokens", "8", "--merge", "style=1",
                "--api-key", alice_key, "hello")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["token_ids"] == expected and json.loads(r.stdout)["delta_version"] == 0

        # errors: one line, non-zero, no traceback
        for args, expect in ((("generate", "--api-key", "ds_wrong", "hi"), "UNAUTHENTICATED"),
                             (("deltas", "show", "nope", "--api-key", alice_key), "NOT_FOUND"),
                             (("tenants", "list", "--api-key", alice_key), "PERMISSION_DENIED"),
                             (("generate", "--merge", "style", "--api-key", alice_key, "hi"), "NAME=WEIGHT"),
                             (("upload", str(tmp_path / "missing"), "--name", "x", "--api-key", alice_key), "no such")):
            r = cli(e, *args)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert expect in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        r = cli(e, "generate", "hi", "--api-key", alice_key, "--server", "127.0.0.1:1", "--timeout", "5")
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr and "Traceback" not in r.stderr

        # SIGTERM while a request streams: it finishes within the grace period, then the server exits 0
        streaming = subprocess.Popen([sys.executable, "-m", "server", "generate", "--temperature", "0", "--ignore-eos",
                                      "--max-new-tokens", "150", "--api-key", alice_key, "hello"], cwd=ROOT, env=e,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = streaming.stdout.read(1)  # the stream has started
        server.proc.send_signal(signal.SIGTERM)
        rest, err = streaming.communicate(timeout=60)
        assert streaming.returncode == 0, err
        assert len((first + rest).encode()) >= 150 // 4  # 150 byte tokens; invalid UTF-8 pieces print as one char
        assert server.proc.wait(timeout=60) == 0, server.stderr[-5:]
        r = cli(e, "deltas", "list", "--api-key", alice_key, "--timeout", "5")
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr  # it is really gone
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    time.sleep(0.1)  # let the pump threads drain the pipes
    assert "deltaserve stopped" in "\n".join(server.stderr)
    assert not any("Traceback" in line for line in server.stderr), server.stderr


def test_cli_without_a_key_says_how_to_get_one(env, tmp_path):
    e, _ = env
    e = dict(e, DELTASERVE_DATA_DIR=str(tmp_path / "empty"))
    r = cli(e, "deltas", "list")
    assert r.returncode == 1 and "no API key" in r.stderr and "Traceback" not in r.stderr
    r = cli(e, "generate")
    assert r.returncode == 2  # argparse: PROMPT is required
