"""A deltaserve server as a child process on loopback, for benchmarks and the soak.

    with ServerProcess(data_dir, settings={"delta_memory_bytes": 1 << 30}) as srv:
        srv.address, srv.metrics_url, srv.admin_key, srv.pid

It runs ``python -m server serve --config <data_dir>/server.json`` with both ports 0 (the OS picks
free ones) and reads the bound ports from the two lines the server announces on stdout. Stop is
SIGTERM, then the server's own drain; a server that outlives its two graces + 30 s is killed and
that is reported.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0  # model load + demo build on 2 busy cores took 15-40 s; 300 s means it is stuck
LOG_TAIL_LINES = 200


def cuda_present() -> bool:
    """A CUDA driver is installed (probed without importing torch, like ``tests/conftest.py``)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


class ServerError(RuntimeError):
    """The server did not start, died, or did not stop; the message carries the tail of its log."""


class ServerProcess:
    def __init__(self, data_dir: str | os.PathLike, settings: dict | None = None, *, model: str | None = None,
                 env: dict | None = None, start_timeout_s: float = START_TIMEOUT_S):
        self.data_dir = Path(data_dir)
        self.settings = dict(settings or {})
        self.model = model
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.metrics_url = ""
        self.admin_key = ""
        self.exit_code: int | None = None
        self.startup_s = 0.0
        self._stdout: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._stderr: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.tracebacks = 0  # "Traceback" lines seen on stderr: a healthy server logs none
        self._threads: list[threading.Thread] = []
        self._announced = threading.Event()
        self._t0 = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(list(self._stderr)[-n:])

    def _pump(self, stream, sink: deque, is_err: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            if is_err and "Traceback (most recent call last)" in line:
                self.tracebacks += 1
            if not is_err:
                if line.startswith("deltaserve listening on "):
                    self.address = line.removeprefix("deltaserve listening on ").strip()
                elif line.startswith("metrics: "):
                    self.metrics_url = line.removeprefix("metrics: ").strip()
                if self.address and self.metrics_url:
                    self._announced.set()
        stream.close()

    def start(self) -> "ServerProcess":
        return self.launch().wait_ready()

    def launch(self) -> "ServerProcess":
        """Start the process and return at once (build payloads meanwhile), then call :meth:`wait_ready`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = {"data_dir": str(self.data_dir), "listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                  "openai_listen": "", "model_path": self.model or "demo", **self.settings}
        config_path = self.data_dir / "server.json"
        config_path.write_text(json.dumps(config, indent=1))
        env = {**os.environ, **(self.env or {})}
        if not cuda_present():
            # Without a GPU the server's Triton kernels would run in the interpreter, tens of ms per launch:
            # serve through the CPU backend, the CPU serving path (as tests/conftest.py does).
            env.setdefault("TRITON_INTERPRET", "1")
            env.setdefault("DELTASERVE_KERNELS", "cpu")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(config_path)],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1)
        for stream, sink, is_err in ((self.proc.stdout, self._stdout, False), (self.proc.stderr, self._stderr, True)):
            t = threading.Thread(target=self._pump, args=(stream, sink, is_err), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait_ready(self) -> "ServerProcess":
        assert self.proc is not None, "launch() first"
        deadline = self._t0 + self.start_timeout_s
        while not self._announced.wait(0.2):
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with status {self.proc.returncode} during start-up:\n"
                                  f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"server did not announce its ports within {self.start_timeout_s:.0f} s:\n"
                                  f"{self.log_tail()}")
        self.startup_s = time.monotonic() - self._t0
        self.admin_key = (self.data_dir / "admin.key").read_text().strip()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM and wait for the drain; returns the exit status (killed: negative)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            from server.config import ServerConfig  # plain dataclass: no torch

            defaults = ServerConfig()
            grace = float(self.settings.get("grace_seconds", defaults.grace_seconds)) + \
                float(self.settings.get("health_grace_seconds", defaults.health_grace_seconds))
            try:
                self.proc.wait(timeout_s if timeout_s is not None else grace + 30.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        for t in self._threads:
            t.join(5.0)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
