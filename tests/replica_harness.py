"""Several real deltaserve replicas as subprocesses (``python -m server serve``), sharing one PostgreSQL
database and one S3 bucket (tests/services.py), behind nginx running the shipped
``deploy/nginx/deltaserve.conf`` with only its addresses changed. For the scenario tests and
``benchmarks/bench_replicas.py``.

All replicas start at once on the empty catalogue: exactly one creates the admin tenant (its key file
is in its data dir), the others find it. Each replica's stdout/stderr go to ``<root>/replica-<i>.log``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.deploy_helpers import NGINX_CONF, nginx_binary, nginx_main_conf
from tests.server_harness import DELTA_BUDGET
from tests.services import free_port, wait_port

START_TIMEOUT_S = 180.0  # three replicas importing torch and transformers at once on 2 busy cores
REPO = Path(__file__).resolve().parent.parent


def render_nginx(addresses: list[str], listen_port: int, *, affinity: bool = True) -> str:
    """The shipped nginx config with the upstream's servers and the listen port replaced; ``affinity=False``
    drops the hash line, which leaves nginx's default round robin (the benchmark's baseline)."""
    text = NGINX_CONF.read_text()
    lines, servers_done = [], False
    for line in text.splitlines():
        if re.match(r"\s*server \S+:\d+ ", line):
            if not servers_done:
                indent = line[: len(line) - len(line.lstrip())]
                options = line.strip().split(" ", 2)[2]
                lines += [f"{indent}server {a} {options}" for a in addresses]
                servers_done = True
            continue
        if re.match(r"\s*listen \d+ http2;", line):
            line = re.sub(r"listen \d+", f"listen 127.0.0.1:{listen_port}", line)
        if not affinity and re.match(r"\s*hash \$deltaserve_affinity consistent;", line):
            continue
        lines.append(line)
    if not servers_done:
        raise ValueError(f"{NGINX_CONF}: no upstream server lines to replace")
    return "\n".join(lines) + "\n"


class Nginx:
    def __init__(self, root: Path, addresses: list[str], *, affinity: bool = True):
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        include = root / "deltaserve.conf"
        include.write_text(render_nginx(addresses, self.port, affinity=affinity))
        conf = nginx_main_conf(root, include)
        self.address = f"127.0.0.1:{self.port}"
        self.log = root / "error.log"
        self.proc = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(root)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port, 30, self.proc, self.log)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the open connections' requests
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Replica:
    """One ``deltaserve serve`` subprocess; its config file is written once and reused by restarts."""

    def __init__(self, index: int, root: Path, config: dict, env: dict):
        self.index = index
        self.id = config["replica_id"]
        self.root = root
        self.port = int(config["listen"].rpartition(":")[2])
        self.metrics_port = int(config["metrics_listen"].rpartition(":")[2])
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.data_dir = Path(config["data_dir"])
        self.config_path = root / f"{self.id}.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log = root / f"{self.id}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(self.config_path)],
                                     stdout=log, stderr=log, env=self.env, cwd=REPO)
        log.close()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.id} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "deltaserve listening on" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"replica {self.id} not listening after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no flush; what the process had in flight is cut."""
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM: the server's own drain (NOT_SERVING, in-flight calls finish), then it exits 0."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            return resp.read().decode()


class ReplicaSet:
    """``n`` replicas on one fresh database and bucket, and nginx in front (``front``: its address)."""

    def __init__(self, root: Path, model_dir: Path, postgres, moto_s3, *, n: int = 3, affinity: bool = True,
                 round_robin_front: bool = False, **config):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.catalogue_url = postgres.database()
        self.bucket = moto_s3.bucket()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DELTASERVE_"))}
        env.update(moto_s3.env)
        env["PYTHONPATH"] = str(REPO)
        base = dict(model_path=str(model_dir), catalogue=self.catalogue_url, blobs=f"s3://{self.bucket}/deltas",
                    delta_memory_bytes=DELTA_BUDGET, max_rank=16, max_batch_tokens=256, max_running=8, max_model_len=512,
                    max_upload_bytes=256 << 10, grace_seconds=2.0, torch_threads=1, blob_cache_bytes=64 << 20,
                    openai_listen="",  # gRPC only: every replica would want the same default HTTP port
                    # scenarios race 3 uploads of one tenant on one replica: its quotas must decide, not the
                    # per-tenant upload bound (2 by default; test_edge_resources tests that one)
                    max_uploads_per_tenant=4,
                    log_level="warning")
        base.update(config)
        self.replicas = []
        for i in range(n):
            cfg = dict(base, replica_id=f"replica-{i}", data_dir=str(root / f"replica-{i}"),
                       listen=f"127.0.0.1:{free_port()}", metrics_listen=f"127.0.0.1:{free_port()}")
            self.replicas.append(Replica(i, root, cfg, env))
        self.nginx: Nginx | None = None
        self.round_robin: Nginx | None = None
        try:
            for r in self.replicas:
                r.start()
            for r in self.replicas:
                r.wait_ready()
            # every replica starts on an empty catalogue: one creates the admin tenant, the others find it
            (key_file,) = [r.data_dir / "admin.key" for r in self.replicas if (r.data_dir / "admin.key").exists()]
            self.admin_key = key_file.read_text().strip()
            addresses = [r.address for r in self.replicas]
            self.nginx = Nginx(root / "nginx", addresses, affinity=affinity)
            if round_robin_front:
                self.round_robin = Nginx(root / "nginx-rr", addresses, affinity=False)
        except BaseException:
            self.close()
            raise
        self.front = self.nginx.address

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    def by_id(self, replica_id: str) -> Replica:
        return next(r for r in self.replicas if r.id == replica_id)

    def ensure_running(self) -> None:
        """Restart any replica a test killed (the next test gets the full set)."""
        dead = [r for r in self.replicas if not r.alive()]
        for r in dead:
            r.start()
        for r in dead:
            r.wait_ready()

    def close(self) -> None:
        for front in (self.nginx, self.round_robin):
            if front is not None:
                front.close()
        for r in self.replicas:
            if r.proc is not None and r.alive():
                r.proc.send_signal(signal.SIGTERM)
        for r in self.replicas:
            r.stop()
