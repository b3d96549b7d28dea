"""The README's walk-through, run as written against `make serve` on the embedded default model.

`make serve` starts in a subprocess with the documented environment variables pointing the server and
the commands at a temporary data dir and free ports (``DELTASERVE_DATA_DIR``, ``DELTASERVE_SERVER``;
``SERVE_ARGS`` for the ports), with the session's converted model linked into that data dir so the
one-minute GGUF conversion happens once per test session (tests/conftest.py ``smollm2``). Every
``$ deltaserve ...`` line of the README block after ``<!-- walkthrough -->`` runs through bash, and its
stdout must be exactly the lines the README shows under it. Then the issue's own checks: ``generate
--greedy "The capital of France is"`` and ``chat`` say Paris; the server log is quiet (no progress bars)
and has one info line per request and per upload.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the real model behind `make serve`: ~1 minute on 2 cores; CI runs it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def walkthrough() -> list[tuple[str, list[str]]]:
    """(command, expected stdout lines) of the README's walk-through block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough -->\s*```console\n(.*?)```", text, flags=re.S)
    assert block, "README.md has no <!-- walkthrough --> console block"
    steps: list[tuple[str, list[str]]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return [(cmd, [l for l in out if l.strip()]) for cmd, out in steps]


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("walk") / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(smollm2.path.parent)  # the session's conversion, reused
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, DELTASERVE_DATA_DIR=str(data_dir), DELTASERVE_SERVER=address,
               PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("DELTASERVE_API_KEY", None)
    serve_args = f"--listen {address} --metrics-listen 127.0.0.1:0 --openai-listen 127.0.0.1:0"
    proc = subprocess.Popen(["make", "-s", "serve", f"SERVE_ARGS={serve_args}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = [], []
    for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=lambda s=stream, k=sink: [k.append(x.rstrip("\n")) for x in s], daemon=True).start()
    deadline = time.monotonic() + 240
    while not any("admin key file" in line for line in out):
        assert proc.poll() is None and time.monotonic() < deadline, f"make serve did not start: {out} {err[-5:]}"
        time.sleep(0.1)
    yield env, out, err
    from server.discovery import note_path

    server_pid = json.loads(note_path(int(address.rpartition(":")[2])).read_text())["pid"]
    os.kill(server_pid, signal.SIGTERM)  # the server drains and exits 0, and so does make
    try:
        assert proc.wait(timeout=60) == 0, err[-5:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def run(env, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_readme_walkthrough_runs_as_written(served):
    env, _, err = served
    steps = walkthrough()
    assert len(steps) >= 4
    for command, expected in steps:
        r = run(env, command)
        assert r.returncode == 0, (command, r.stderr)
        got = [line for line in r.stdout.splitlines() if line.strip()]
        assert got == expected, f"{command}\nREADME shows: {expected}\nit printed:   {got}"


def test_paris_from_a_fresh_make_serve(served):
    env, out, err = served
    r = run(env, 'deltaserve generate --greedy "The capital of France is"')
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = run(env, 'deltaserve chat "What is the capital of France?"')
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = run(env, 'printf "What is the capital of France?\\n" | deltaserve chat --greedy')  # a session on stdin
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr


def test_the_server_log_is_quiet_and_says_one_line_per_request(served):
    env, out, err = served
    before = sum("event=generate" in line for line in err)
    r = run(env, 'deltaserve generate --greedy --max-new-tokens 4 "Hello"')
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while sum("event=generate" in line for line in err) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in err if "event=generate" in line]
    assert len(lines) == before + 1 and "api=grpc" in lines[-1] and "status=ok" in lines[-1]
    assert "completion_tokens=4" in lines[-1]
    assert not any("Loading weights" in line or "it/s]" in line for line in err), err[:5]
    assert any("event=model_loaded" in line and "model=SmolLM2-135M-Instruct" in line for line in err)
    assert any("event=max_model_len" in line and "value=8192" in line for line in err)
