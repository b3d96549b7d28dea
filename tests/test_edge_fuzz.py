"""A bounded fuzz of the upload path over gRPC (issue 15): truncated, bit-flipped and random payloads of every
accepted format (PEFT, AdapterHub, OpenDelta, native, BitFit; tar.gz and zip archives; safetensors and torch
files), a few hundred cases. Each must be answered INVALID_ARGUMENT or FAILED_PRECONDITION within its
deadline (never INTERNAL, never a hang), store nothing, leave no scratch file, and the server must keep
serving: a Health check and a small Generate pass after every batch. Served on the fixture Llama base
(tests/fixtures/base/llama), so the AdapterHub and OpenDelta fixtures are valid uploads before mutation."""
from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from delta_store import BaseSpec
from server.client import generate_request
from tests.fuzz_payloads import mutations, valid_payloads
from tests.helpers import FIXTURES
from tests.server_harness import Served, auth, upload

CALL_DEADLINE_S = 20.0  # a case that takes longer is a hang (the slowest real case takes ~0.1 s)
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def fixture_base(tmp_path_factory):
    """The fixture Llama (vocab 256) with the byte-level tokenizer saved beside it; prompts here are token ids."""
    from server.engine.tokenizer import byte_level_tokenizer

    folder = tmp_path_factory.mktemp("base") / "llama"
    shutil.copytree(FIXTURES / "base" / "llama", folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def srv(tmp_path_factory, fixture_base):
    served = Served(tmp_path_factory.mktemp("server"), model_dir=fixture_base, max_model_len=128, max_rank=16,
                    max_bottleneck=64, max_upload_bytes=1 << 20)
    yield served
    served.close()


def test_upload_fuzz_is_refused_cleanly_and_the_server_keeps_serving(srv, fixture_base):
    from transformers import AutoModelForCausalLM

    spec = BaseSpec.from_model(AutoModelForCausalLM.from_pretrained(fixture_base))
    payloads = valid_payloads(fixture_base, spec)
    _tenant, key = srv.client.create_tenant("fuzzer", quotas={"max_deltas": 1000})
    md, mine = auth(key), srv.client.with_key(key)
    data_dir = Path(srv.app.config.data_dir)
    for name, data in payloads.items():  # every seed is a valid upload: a mutation breaks a real payload
        assert upload(srv, md, "seed", data).digest, name
    assert mine.delete_delta("seed") == len(payloads)
    blobs_before = {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}

    cases = mutations(payloads, random.Random(15))
    assert len(cases) >= 200
    health = health_pb2_grpc.HealthStub(srv.client.channel)
    outcomes, bad, t0 = Counter(), [], time.monotonic()
    for k, (case, data) in enumerate(cases):
        try:
            upload(srv, md, f"f{k}", data, total=len(data), timeout=CALL_DEADLINE_S)
            outcomes["OK"] += 1
            bad.append((case, "accepted"))
        except grpc.RpcError as exc:
            outcomes[exc.code().name] += 1
            if exc.code() not in REFUSALS:
                bad.append((case, f"{exc.code().name}: {exc.details()}"))
            elif "upload-" in exc.details() or ".payload" in exc.details() or str(data_dir) in exc.details():
                bad.append((case, f"names a scratch file: {exc.details()}"))
        if k % 25 == 24:
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5.0).status == \
                health_pb2.HealthCheckResponse.SERVING
            reply = list(srv.inference.Generate(generate_request([5, 6, 7], max_new_tokens=2, ignore_eos=True),
                                                metadata=md, timeout=10.0))
            assert sum(len(c.token_ids) for c in reply) == 2
    elapsed = time.monotonic() - t0
    assert bad == [], f"{len(bad)} of {len(cases)} cases misbehaved ({dict(outcomes)}): {bad[:5]}"
    assert mine.list_deltas() == []
    assert {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()} == blobs_before
    assert [p for p in (data_dir / "tmp").rglob("*")] == []
    assert elapsed < 60, f"{len(cases)} cases took {elapsed:.0f} s"
    print(f"upload fuzz: {len(cases)} cases in {elapsed:.1f} s: {dict(outcomes)}")
