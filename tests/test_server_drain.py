"""SIGTERM as a load balancer and a user see it (issue 15): Health answers NOT_SERVING for
``health_grace_seconds`` while the listener stays open and running streams finish; a call the drain has
to cut is ended by the server with UNAVAILABLE "shutting down", and the CLI says so (not "cannot reach
the server"). A real server process, the real CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from load.server_proc import ServerProcess  # noqa: E402

HEALTH_GRACE_S = 3.0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from server.demo import build_demo_model

    return str(build_demo_model(tmp_path_factory.mktemp("m") / "model", hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2))


def test_sigterm_health_grace_streams_finish_and_the_cli_names_the_drain(tmp_path, model):
    data = tmp_path / "data"
    server = ServerProcess(data, {"grace_seconds": 1.0, "health_grace_seconds": HEALTH_GRACE_S},
                           model=model).start()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DELTASERVE_DATA_DIR=str(data), DELTASERVE_SERVER=server.address)
    env.pop("DELTASERVE_API_KEY", None)
    client = Client(server.address, server.admin_key)
    health = health_pb2_grpc.HealthStub(client.channel)
    try:
        cut = subprocess.Popen([sys.executable, "-m", "server", "generate", "--max-new-tokens", "2000",
                                "--ignore-eos", "--temperature", "0", "hi"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        finishing = client.generate([5, 6, 7], max_new_tokens=40, ignore_eos=True, temperature=0.0)
        first = next(finishing)  # running before the SIGTERM
        time.sleep(1.0)  # the CLI's call is streaming too
        assert cut.poll() is None, cut.communicate()
        server.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        statuses = []
        while time.monotonic() - t0 < HEALTH_GRACE_S - 1.0:
            statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=2.0).status)
            time.sleep(0.1)
        assert set(statuses) == {health_pb2.HealthCheckResponse.NOT_SERVING}, statuses
        # the listener is still open: a new call is still served during the health grace
        assert len([t for c in client.generate([9, 9], max_new_tokens=3, ignore_eos=True) for t in c.token_ids]) == 3
        rest = list(finishing)
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 40
        out, err = cut.communicate(timeout=60)
        assert cut.returncode == 1, (out, err)
        assert "cannot reach" not in err and "shutting down" in err, err
    finally:
        client.close()
        code = server.stop()
    assert code == 0
    with pytest.raises(grpc.RpcError):  # and afterwards the listener is closed
        with Client(server.address, server.admin_key) as c:
            c.list_tenants(timeout=2.0)
