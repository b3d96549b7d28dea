"""GenerateRequest.merge end to end over gRPC: two uploaded PEFT LoRAs served merged with weights (0.7, 0.3)
give PEFT's ``add_weighted_adapter(..., combination_type="cat")`` tokens, token for token; the merged delta is
built once and reused; non-mergeable kinds, another tenant's delta, bad weights and a merge next to ``delta``
are refused with their status and reason; deleting a part drops the merges that used it."""
from __future__ import annotations

import io
import math
import tarfile
import tempfile
from pathlib import Path

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from server.client import generate_request
from server.pb import deltas_pb2
from tests.oracles import randomise_peft
from tests.server_harness import PROMPT, Served, code_of, collect, greedy, upload

CONFIGS = {
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "down_proj"]),
    "d": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True),
}


def _tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    srv = Served(tmp_path_factory.mktemp("server"))
    base = AutoModelForCausalLM.from_pretrained(srv.model_dir, dtype=torch.float32).eval()
    pm = get_peft_model(base, CONFIGS["a"], adapter_name="a")
    for name in ("b", "d"):
        pm.add_adapter(name, CONFIGS[name])
    randomise_peft(pm, seed=4, std=0.3)
    pm.eval()
    alice = srv.tenant("alice")
    payloads = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            pm.set_adapter(name)
            pm.save_pretrained(tmp, selected_adapters=[name])
            payloads[name] = _tar(Path(tmp) / name)  # a non-default adapter lands in a subfolder named after it
            upload(srv, alice, name, payloads[name])
    pm.add_weighted_adapter(["a", "b"], [0.7, 0.3], "m", combination_type="cat")
    pm.set_adapter("m")
    yield srv, alice, pm, payloads
    srv.close()


def merge_request(parts, n=10, delta=""):
    return generate_request(PROMPT, delta=delta, merge=parts, max_new_tokens=n, temperature=0.0, ignore_eos=True)


def test_merged_tokens_equal_peft_cat_merge_and_are_built_once(setup):
    srv, alice, pm, _ = setup
    want = greedy(pm, PROMPT, 10)
    with pm.disable_adapter():
        base_tokens = greedy(pm, PROMPT, 10)
    assert want != base_tokens, "the merge does not change greedy output; the test would prove nothing"
    tokens, chunks = collect(srv.inference.Generate(merge_request([("a", 0.7), ("b", 0.3)]), metadata=alice))
    assert tokens == want
    assert chunks[-1].delta_version == 0  # a merge is no catalogue version
    builds = srv.app.merges.builds
    again, _ = collect(srv.inference.Generate(merge_request([("a@1", 0.7), ("b", 0.3)]), metadata=alice))
    assert again == want and srv.app.merges.builds == builds, "the same recipe must reuse the built merge"
    other, _ = collect(srv.inference.Generate(merge_request([("a", 0.3), ("b", 0.7)]), metadata=alice))
    assert other != want  # other weights: another merged delta
    info = srv.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name="a"), metadata=alice).delta
    assert info.usage.requests >= 3  # a merge counts towards each part
    srv.idle()


@pytest.mark.parametrize("parts,delta,code,reason", [
    ([("a", 0.5), ("d", 0.5)], "", grpc.StatusCode.INVALID_ARGUMENT, "d cannot be merged exactly: it holds dora"),
    ([("a", math.nan)], "", grpc.StatusCode.INVALID_ARGUMENT, "not a finite number"),
    ([("a", 1.0)], "b", grpc.StatusCode.INVALID_ARGUMENT, "set delta or merge, not both"),
    ([("a", 1.0)] * 9, "", grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
    ([("a", 1.0), ("nope", 1.0)], "", grpc.StatusCode.NOT_FOUND, "nope"),
])
def test_bad_merges_are_refused_with_the_reason(setup, parts, delta, code, reason):
    srv, alice, _, _ = setup
    err = code_of(lambda: collect(srv.inference.Generate(merge_request(parts, delta=delta), metadata=alice)))
    assert err.code() == code and reason in err.details(), err.details()


def test_another_tenants_delta_in_a_merge_is_not_found(setup):
    srv, alice, _, payloads = setup
    bob = srv.tenant("bob")
    upload(srv, bob, "mine", payloads["b"])
    err = code_of(lambda: collect(srv.inference.Generate(merge_request([("a", 0.5), ("mine", 0.5)]), metadata=alice)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = code_of(lambda: collect(srv.inference.Generate(merge_request([("a", 0.5)]), metadata=bob)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_merged_rank_above_max_rank_is_refused(setup):
    srv, alice, _, _ = setup  # the harness serves max_rank 16; q_proj of a x 5 has rank 20
    err = code_of(lambda: collect(srv.inference.Generate(merge_request([("a", 0.2)] * 5), metadata=alice)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "above the server's max_rank 16" in err.details()


def test_deleting_a_part_drops_its_merges(setup):
    srv, alice, pm, payloads = setup
    collect(srv.inference.Generate(merge_request([("b", 1.0), ("a", -0.5)], n=2), metadata=alice))
    before = len(srv.app.merges)
    srv.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name="b"), metadata=alice)
    assert len(srv.app.merges) < before
    err = code_of(lambda: collect(srv.inference.Generate(merge_request([("a", 0.7), ("b", 0.3)]), metadata=alice)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    upload(srv, alice, "b", payloads["b"])  # re-uploaded: a new version, a new merge, the same output
    tokens, _ = collect(srv.inference.Generate(merge_request([("a", 0.7), ("b", 0.3)]), metadata=alice))
    assert tokens == greedy(pm, PROMPT, 10)
    srv.idle()
