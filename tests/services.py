"""Real services on loopback for the tests, each started once per session by a fixture in conftest.py.

- :class:`Postgres`: Debian's ``postgresql`` binaries, a cluster initdb'd into a temp folder, run as a
  non-root user (``postgres`` when the tests run as root, as CI does), TCP on 127.0.0.1 at a free port,
  trust auth (nothing but loopback reaches it). Each test takes a fresh database (~0.1 s).
- :class:`MotoS3`: moto's standalone server (``python -m moto.server``), a real HTTP S3 endpoint on
  127.0.0.1; each test takes a fresh bucket. The code under test speaks only the standard S3 API.

Durability settings are off in the test cluster (``fsync=off``): the tests kill replicas and restart
PostgreSQL cleanly, they never cut the machine's power.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}"
                               + (f": {log.read_text()[-2000:]}" if log and log.exists() else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def missing(what: str, install: str):
    """A service the suite needs is not installed: fail in CI (``.ci/run`` installs it), skip elsewhere."""
    message = f"{what} not found ({install})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL server (``/usr/lib/postgresql/<N>/bin``), else ``initdb`` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.user = "deltaserve"
        self.root = Path(tempfile.mkdtemp(prefix="deltaserve-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._run_as = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            self._run_as = pwd.getpwnam("postgres")
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)
        self._as_owner([str(bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                        "--no-sync", "--no-instructions"], check=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    def _as_owner(self, cmd: list[str], **kwargs):
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root, **kwargs)

    def start(self) -> None:
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
               "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=32MB"]
        kwargs = {}
        if self._run_as is not None:
            kwargs = dict(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.root, **kwargs)
        log.close()
        wait_port(self.port, START_TIMEOUT_S, self.proc, self.log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:  # "the database system is starting up"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are cut, the next start recovers nothing (clean)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)
        self.proc = None

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL the catalogue takes."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class MotoS3:
    """moto's S3 server as a subprocess; ``env`` holds what a boto3 client (or a replica) needs."""

    def __init__(self):
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="deltaserve-moto-"))
        self.log = self.root / "moto.log"
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": self.endpoint}
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=log, cwd=self.root)
        log.close()
        wait_port(self.port, START_TIMEOUT_S, self.proc, self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the port opens before the first request is answered
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def client(self):
        return self.client_for(self.endpoint)

    @staticmethod
    def client_for(endpoint: str):
        """A boto3 S3 client of the server at ``endpoint`` (in a forked child too, with nothing shared)."""
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                              aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        name = "t-" + uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
