"""Prompt parts through the store: the native format's round trip and digests, uploads of every prompt
format (folders and archives), and bad prompt input refused at upload with the tensor and the shape named,
leaving nothing stored."""
from __future__ import annotations

import copy
import math
import tarfile

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

from delta_store import BaseSpec, DeltaStore
from delta_store.delta import Delta, LoraTerm, ModuleDelta
from delta_store.errors import BaseMismatch, DeltaError
from delta_store.native import PROMPT_KEY, digest_bytes, dump_native, load_native
from delta_store.prompt import PromptPart
from delta_store.validate import Limits
from tests.helpers import FIXTURES, random_delta, store_settings, tiny_llama
from tests.oracles import randomise_peft


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=4)


@pytest.fixture(scope="module")
def spec(base):
    return BaseSpec.from_model(base)


@pytest.fixture
def store(tmp_path, spec):
    with DeltaStore.open(tmp_path / "data", spec, Limits(max_rank=8, max_bottleneck=16, max_model_len=64),
                         store_settings(max_upload_bytes=1 << 20)) as s:
        yield s


def kv_delta(spec, n=5, *, layers=None, heads=None, head_dim=None, seed=0, positions="from_zero") -> Delta:
    g = torch.Generator().manual_seed(seed)
    shape = (layers or spec.num_layers, n, heads or spec.num_kv_heads, head_dim or spec.head_dim)
    part = PromptPart(keys=torch.randn(shape, generator=g), values=torch.randn(shape, generator=g),
                      positions=positions)
    return Delta({}, "native", spec.fingerprint, "kv prefix", prompt=part)


def save_native(delta: Delta, path):
    path.write_bytes(dump_native(delta))
    return path


def test_native_round_trip_keeps_every_prompt_field_and_bytes_are_deterministic(spec):
    mam = random_delta(spec, rank=2, seed=3)
    g = torch.Generator().manual_seed(5)
    for part in (PromptPart(embeddings=torch.randn(3, 64, generator=g)),
                 PromptPart(keys=torch.randn(2, 3, 2, 16, generator=g).half(),
                            values=torch.randn(2, 3, 2, 16, generator=g).half(), positions="from_zero")):
        delta = Delta(mam.modules, "adapterhub", spec.fingerprint, "with a prompt", prompt=part)
        data = dump_native(delta)
        assert dump_native(load_native(data)) == data  # same delta, same bytes, same digest
        back = load_native(data)
        assert back.kinds() == {"lora", part.kind}
        assert (back.prompt.positions, back.prompt.form, back.num_virtual_tokens) == (part.positions, part.form, 3)
        for name, t in part.tensors().items():
            assert back.prompt.tensors()[name].dtype == t.dtype and torch.equal(back.prompt.tensors()[name], t)
    # a delta without a prompt part has the bytes it had before prompt parts existed
    assert PROMPT_KEY.encode() not in dump_native(mam)
    a, b = kv_delta(spec, seed=1), kv_delta(spec, seed=2)
    assert digest_bytes(dump_native(a)) != digest_bytes(dump_native(b))
    c = kv_delta(spec, seed=1, positions="after_prefix")  # same tensors, other position policy: another delta
    assert digest_bytes(dump_native(a)) != digest_bytes(dump_native(c))


def test_native_prompt_metadata_must_match_its_tensors(spec):
    data = dump_native(kv_delta(spec))
    bad = data.replace(b'\\"num_virtual_tokens\\":5', b'\\"num_virtual_tokens\\":6')
    assert bad != data
    with pytest.raises(DeltaError, match="num_virtual_tokens 6 does not match"):
        load_native(bad)


def test_every_prompt_format_uploads(tmp_path, store, base, spec):
    tenant, _ = store.tenants.create("t")
    pm = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    randomise_peft(pm, 1)
    pm.eval().save_pretrained(tmp_path / "pt")
    pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    randomise_peft(pm, 2)
    pm.eval().save_pretrained(tmp_path / "pfx")
    archive = tmp_path / "mam.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(FIXTURES / "adapterhub" / "llama-mam", arcname="llama-mam")
    uploads = {"peft-prompt": (tmp_path / "pt", {"prompt"}), "peft-prefix": (tmp_path / "pfx", {"prefix"}),
               "ah-mam": (archive, {"prefix", "bottleneck"}),
               "od-soft": (FIXTURES / "opendelta" / "llama-soft_prompt", {"prompt"}),
               "native": (save_native(kv_delta(spec), tmp_path / "kv.safetensors"), {"prefix"})}
    for name, (path, kinds) in uploads.items():
        version = store.put(tenant, name, path)
        assert set(version.kinds) == kinds, name
        store.host.discard(version.digest)
        loaded = store.load_key(version.key)  # from the blob on disk
        assert loaded.prompt is not None and loaded.base_fingerprint == spec.fingerprint


BAD = [
    ("layers", dict(layers=3), r"prompt.keys: shape \(3, 5, 2, 16\): 3 layers, the served llama base has 2 layers"),
    ("kv_heads", dict(heads=4), r"prompt.keys: shape \(2, 5, 4, 16\): 4 KV heads, the served llama base has 2 KV heads"),
    ("head_size", dict(head_dim=8), r"prompt.keys: shape \(2, 5, 2, 8\): head size 8, the served llama base has head size 16"),
    ("too_long", dict(n=63), "num_virtual_tokens 63 leaves no room under the server's max_model_len 64"),
]


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_prefix_refused_and_nothing_stored(tmp_path, store, spec, name, change, message):
    tenant, _ = store.tenants.create("t")
    path = save_native(kv_delta(spec, **change), tmp_path / f"{name}.safetensors")
    with pytest.raises(DeltaError, match=message):
        store.put(tenant, name, path)
    assert store.catalogue.referenced_digests() == set()
    assert list(store.blobs.iter()) == []


def test_nan_embeddings_another_base_and_wrong_hidden_refused(tmp_path, store, spec):
    tenant, _ = store.tenants.create("t")
    e = torch.randn(4, 64)
    e[2, 7] = math.nan
    nan = Delta({}, "native", spec.fingerprint, prompt=PromptPart(embeddings=e))
    with pytest.raises(DeltaError, match=r"prompt.embeddings \(4, 64\): tensor holds NaN or Inf"):
        store.put(tenant, "nan", save_native(nan, tmp_path / "nan.safetensors"))
    other = kv_delta(spec)
    other.base_fingerprint = "0" * 32
    with pytest.raises(BaseMismatch, match="made for base 000000000000"):
        store.put(tenant, "other", save_native(other, tmp_path / "other.safetensors"))
    wide = Delta({}, "native", spec.fingerprint, prompt=PromptPart(embeddings=torch.randn(4, 128)))
    with pytest.raises(DeltaError, match=r"prompt.embeddings: shape \(4, 128\), expected \[num_virtual_tokens, 64\]"):
        store.put(tenant, "wide", save_native(wide, tmp_path / "wide.safetensors"))
    # a GPT-2 prefix (4 KV heads, hidden 64) uploaded to the Llama base (2 KV heads)
    with pytest.raises(DeltaError, match=r"prefix MLP output.*shape \(5, 256\), expected \[num_virtual_tokens, 128\]"):
        store.put(tenant, "gpt2-prefix", FIXTURES / "adapterhub" / "gpt2-prefix_tuning")
    # a LoRA + prompt delta whose prompt is bad is refused whole: its LoRA is not stored either
    mixed = Delta({"model.layers.0.self_attn.q_proj": ModuleDelta(lora=LoraTerm(torch.ones(2, 64), torch.ones(64, 2),
                                                                                1.0))},
                  "native", spec.fingerprint, prompt=PromptPart(embeddings=torch.randn(70, 64)))
    with pytest.raises(DeltaError, match="num_virtual_tokens 70"):
        store.put(tenant, "mixed", save_native(mixed, tmp_path / "mixed.safetensors"))
    assert store.catalogue.referenced_digests() == set() and list(store.blobs.iter()) == []


def test_structure_errors(spec):
    with pytest.raises(DeltaError, match="exactly one form"):
        PromptPart().check_structure()
    with pytest.raises(DeltaError, match="must come together"):
        PromptPart(keys=torch.zeros(2, 1, 2, 16)).check_structure()
    with pytest.raises(DeltaError, match="positions 'after_prefix'"):
        PromptPart(embeddings=torch.zeros(2, 64), positions="from_zero").check_structure()
    with pytest.raises(DeltaError, match="not one of"):
        PromptPart(embeddings=torch.zeros(2, 64), positions="middle").check_structure()
