"""server/client.py against a real server: both faces (Client, AsyncClient), every method, with_key sharing
one channel, folder uploads packed as tar.gz, and refusals surfacing as grpc.RpcError with the server's code."""
from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import grpc
import pytest

from server.client import FINISH_NAMES, AsyncClient, Client, generate_request, source_format
from server.pb import common_pb2
from tests.server_harness import PROMPT, Served, greedy, peft_lora


ROOT = Path(__file__).resolve().parents[1]


def test_client_and_metrics_imports_stay_light():
    # the load process imports the client and must leave the cores to the server: no torch; the metrics
    # module reads server.engine.stats, which must not pull in the engine (transformers, ~6 s)
    code = ("import sys, server.client, server.cli, server.metrics; "
            "print(sorted(m for m in ('torch', 'transformers', 'server.engine.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("client"))
    yield served
    served.close()


@pytest.fixture(scope="module")
def lora(srv):
    return peft_lora(srv.model_dir, seed=3)


def test_generate_request_takes_text_or_ids_and_drops_unset_sampling():
    by_text = generate_request("hi", delta="d@2", max_new_tokens=5, seed=None, temperature=0.0)
    assert by_text.WhichOneof("prompt") == "text" and by_text.delta == "d@2"
    assert by_text.sampling.max_new_tokens == 5 and by_text.sampling.HasField("temperature")
    assert not by_text.sampling.HasField("seed")
    by_ids = generate_request([3, 4], request_id="r1")
    assert list(by_ids.token_ids.ids) == [3, 4] and by_ids.request_id == "r1"
    assert source_format("peft") == common_pb2.SOURCE_FORMAT_PEFT
    with pytest.raises(ValueError, match="one of auto, peft"):
        source_format("lora")


def test_sync_face_tenants_deltas_and_generation(srv, lora, tmp_path):
    data, merged = lora
    folder = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")
    admin = srv.client
    tenant, key = admin.create_tenant("carol", quotas={"max_deltas": 5})
    assert tenant.name == "carol" and tenant.quotas.max_deltas == 5 and key.startswith("ds_")
    assert tenant.quotas.requests_per_minute == 600  # unset fields take the server's defaults
    assert "carol" in [t.name for t in admin.list_tenants()]
    assert admin.set_quotas("carol", max_concurrent=3).quotas.max_concurrent == 3

    with Client(srv.address, key, timeout=30.0) as carol:
        seen = []
        v1 = carol.upload("style", folder, description="from a folder", labels={"team": "a"},
                          on_progress=lambda sent, total: seen.append((sent, total)))
        assert (v1.name, v1.version, v1.description, dict(v1.labels)) == ("style", 1, "from a folder", {"team": "a"})
        assert seen and seen[-1][0] == seen[-1][1] > 0
        v2 = carol.upload("style", data, format="peft")  # bytes: the tar.gz itself
        assert v2.version == 2 and v2.digest == v1.digest  # same weights, same native blob
        assert [v.version for v in carol.get_delta("style").versions] == [1, 2]
        assert [d.name for d in carol.list_deltas(page_size=1)] == ["style"]
        assert carol.preload_delta("style@1").version.version == 1
        chunks = list(carol.generate(PROMPT, delta="style", max_new_tokens=6, temperature=0.0, ignore_eos=True))
        assert [t for c in chunks for t in c.token_ids] == greedy(merged, PROMPT, 6)
        assert FINISH_NAMES[chunks[-1].finish_reason] == "length"
        text = list(carol.generate("hello", max_new_tokens=3, temperature=0.0, logprobs=True, ignore_eos=True))
        assert sum(len(c.logprobs) for c in text) == 3
        with pytest.raises(grpc.RpcError) as info:
            carol.list_tenants()  # not an admin
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert carol.delete_delta("style@1") == 1 and carol.delete_delta("style") == 1

    new_key = admin.rotate_key("carol")
    with pytest.raises(grpc.RpcError) as info:
        admin.with_key(key).list_deltas()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert admin.with_key(new_key).list_deltas() == []
    admin.delete_tenant("carol")
    assert "carol" not in [t.name for t in admin.list_tenants()]


def test_async_face_and_with_key_sharing_the_channel(srv, lora):
    data, merged = lora

    async def scenario():
        async with AsyncClient(srv.address, srv.admin_key, timeout=30.0) as admin:
            _tenant, key = await admin.create_tenant("dave")
            dave = admin.with_key(key)
            assert dave.channel is admin.channel and dave.api_key == key
            assert (await dave.upload("style", data)).version == 1
            assert [v.version for v in (await dave.get_delta("style")).versions] == [1]
            assert [d.name for d in await dave.list_deltas()] == ["style"]
            assert (await dave.preload_delta("style", device=False)).version.version == 1
            call = dave.generate(PROMPT, delta="style", max_new_tokens=5, temperature=0.0, ignore_eos=True)
            tokens = [t async for c in call for t in c.token_ids]
            assert tokens == greedy(merged, PROMPT, 5)
            cancelled = dave.generate(PROMPT, max_new_tokens=200, temperature=0.0, ignore_eos=True)
            async for _ in cancelled:
                cancelled.cancel()
                break
            assert cancelled.cancelled()
            await dave.close()  # a with_key view leaves the shared channel open: both keep working
            assert await dave.delete_delta("style") == 1
            assert (await admin.set_quotas("dave", max_deltas=2)).quotas.max_deltas == 2
            new_key = await admin.rotate_key("dave")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await dave.list_deltas()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await admin.with_key(new_key).list_deltas() == []
            assert "dave" in [t.name for t in await admin.list_tenants()]
            await admin.delete_tenant("dave")
            assert "dave" not in [t.name for t in await admin.list_tenants()]

    asyncio.run(scenario())
