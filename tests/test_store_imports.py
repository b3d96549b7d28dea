"""store.put: imports (native, PEFT folder and archives), round trip, parity with PEFT through the
store and the delta model, and one refusal per class of bad input, each leaving nothing stored."""
from __future__ import annotations

import copy
import math
import tarfile
import zipfile

import pytest
import torch
from peft import LoraConfig, get_peft_model

from delta_store import BaseSpec, DeltaStore
from delta_store.delta import LoraTerm, ModuleDelta
from delta_store.errors import BaseMismatch, DeltaError, InvalidArgument, NotFound, ResourceExhausted
from delta_store.native import digest_bytes, dump_native
from delta_store.validate import Limits
from tests.helpers import (assert_close, assert_nothing_stored, import_delta, random_delta, store_settings,
                           tiny_llama)

IDS = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=4)


@pytest.fixture(scope="module")
def spec(base):
    return BaseSpec.from_model(base)


@pytest.fixture
def store(tmp_path, spec):
    with DeltaStore.open(tmp_path / "data", spec, Limits(max_rank=8, max_bottleneck=16),
                         store_settings(max_upload_bytes=1 << 20)) as s:
        yield s


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory):
    """A PEFT LoRA folder (r=4, q/v/down, random non-zero weights) and the live PeftModel."""
    folder = tmp_path_factory.mktemp("peft") / "my_adapter"
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(folder)
    return folder, pm


def tar_folder(folder, path, mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        tar.add(folder, arcname=folder.name)
    return path


def test_peft_archives_round_trip_to_the_same_digest(store, spec, peft_folder, tmp_path):
    folder, _ = peft_folder
    tenant, _ = store.tenants.create("acme")
    tgz = tar_folder(folder, tmp_path / "a.tar.gz")
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"{folder.name}/{f.name}")
    v1 = store.put(tenant, "qa", tgz, description="first", labels={"team": "x"})
    v2 = store.put(tenant, "qa", z)
    v3 = store.put(tenant, "qa", folder)  # an unpacked folder (the CLI's local path)
    assert (v1.version, v2.version, v3.version) == (1, 2, 3)
    assert v1.digest == v2.digest == v3.digest, "same adapter, same native bytes"
    assert v1.kinds == ("lora",) and v1.max_rank == 4 and v1.source_format == "peft"
    expected = import_delta(folder, spec)  # the formats engineer's importer, directly
    store.host.discard(v1.digest)
    loaded = store.load(store.resolve(tenant, "qa@1"))  # from disk, digest checked
    assert store.stats().disk_loads == 1
    assert digest_bytes(dump_native(loaded)) == v1.digest
    assert loaded.modules.keys() == expected.modules.keys()
    for path, md in expected.modules.items():
        assert torch.equal(loaded.modules[path].lora.a, md.lora.a)
        assert torch.equal(loaded.modules[path].lora.b, md.lora.b)
        assert loaded.modules[path].lora.scale == md.lora.scale
    got = store.get(tenant, "qa@1")
    assert (got.description, got.labels) == ("first", {"team": "x"})
    assert store.resolve(tenant, "qa").version == 3


def test_parity_with_peft_through_the_store_and_delta_model(store, base, peft_folder, tmp_path):
    from server.deltas import wrap_model

    folder, pm = peft_folder
    tenant, _ = store.tenants.create("acme")
    version = store.put(tenant, "qa", tar_folder(folder, tmp_path / "a.tgz"))
    store.host.discard(version.digest)
    delta = store.load_key(version.key)
    dm = wrap_model(copy.deepcopy(base), max_slots=2, max_rank=8, max_bottleneck=16)
    dm.set_delta(1, delta)
    dm.batch.prepare_sequences([1], [IDS.shape[1]])
    with torch.no_grad():
        ours = dm.model(input_ids=IDS).logits
        theirs = pm(input_ids=IDS).logits
        plain = base(input_ids=IDS).logits
    assert (theirs - plain).abs().max() > 1e-3, "the adapter is a no-op; parity would prove nothing"
    assert_close(ours, theirs, atol=1e-5, what="store-loaded delta vs PEFT")


def test_native_upload_without_suffix_and_dedup_across_tenants(store, spec, tmp_path):
    a, _ = store.tenants.create("a")
    b, _ = store.tenants.create("b")
    f = tmp_path / "spooled-upload"  # the gRPC edge spools bytes to a nameless temp file
    f.write_bytes(dump_native(random_delta(spec, rank=4)))
    va, vb = store.put(a, "same", f), store.put(b, "same", f)
    assert va.digest == vb.digest and len(list(store.blobs.iter())) == 1
    with pytest.raises(NotFound):
        store.resolve(a, "missing")
    store.delete(a, "same")
    assert store.blobs.exists(vb.digest), "b's version still references the blob"
    store.delete(b, "same")
    assert not store.blobs.exists(vb.digest)


def _native(tmp_path, delta, name="d.safetensors"):
    f = tmp_path / name
    f.write_bytes(dump_native(delta))
    return f


def _bad_payload(case, tmp_path, spec, peft_folder):
    q = "model.layers.0.self_attn.q_proj"
    good = random_delta(spec, rank=4)
    if case == "missing_file":
        return tmp_path / "does-not-exist.tgz", DeltaError, "no such file"
    if case == "truncated_safetensors":
        f = _native(tmp_path, good)
        f.write_bytes(f.read_bytes()[:-100])  # header intact, data cut short (an interrupted copy)
        return f, DeltaError, "corrupt safetensors data"
    if case == "corrupted_peft_safetensors":
        folder = tmp_path / "peft_bad"
        folder.mkdir()
        for src in peft_folder[0].iterdir():
            data = src.read_bytes()
            if src.suffix == ".safetensors":
                data = data[:8] + b"\xff" * 64 + data[72:]
            (folder / src.name).write_bytes(data)
        # the message names the upload and the member, never the server's scratch folder
        return (tar_folder(folder, tmp_path / "bad.tgz"), DeltaError,
                r"^bad\.tgz:peft_bad/adapter_model\.safetensors: not a readable")
    if case == "wrong_shapes":
        good.modules[q].lora.a = torch.zeros(4, spec.hidden_size + 3)
        return _native(tmp_path, good), DeltaError, "expected shape"
    if case in ("nan", "inf"):
        good.modules[q].lora.b[0, 0] = math.nan if case == "nan" else math.inf
        return _native(tmp_path, good), DeltaError, "NaN or Inf"
    if case == "rank_above_max":
        return _native(tmp_path, random_delta(spec, rank=16)), DeltaError, "max_rank"
    if case == "unknown_target":
        info = spec.modules[q]
        good.modules["model.layers.9.self_attn.q_proj"] = ModuleDelta(
            lora=LoraTerm(torch.zeros(2, info.in_features), torch.zeros(info.out_features, 2), 1.0))
        return _native(tmp_path, good), DeltaError, "not a module"
    if case == "bad_config_json":
        folder = tmp_path / "peft_badcfg"
        folder.mkdir()
        for src in peft_folder[0].iterdir():
            (folder / src.name).write_bytes(b"{'peft_type': LORA,," if src.name == "adapter_config.json"
                                            else src.read_bytes())
        return tar_folder(folder, tmp_path / "badcfg.tgz"), DeltaError, "adapter_config.json"
    if case == "oversize":
        f = tmp_path / "big.safetensors"
        f.write_bytes(b"\0" * ((1 << 20) + 1))
        return f, DeltaError, "upload limit"
    if case == "wrong_base":
        good.base_fingerprint = "f" * 32
        return _native(tmp_path, good), BaseMismatch, "base"
    if case == "archive_escape":
        f = tmp_path / "evil.tgz"
        with tarfile.open(f, "w:gz") as tar:
            tar.add(peft_folder[0] / "adapter_config.json", arcname="../adapter_config.json")
        return f, DeltaError, "'..'"
    raise AssertionError(case)


BAD_CASES = ["missing_file", "truncated_safetensors", "corrupted_peft_safetensors", "wrong_shapes", "nan", "inf",
             "rank_above_max", "unknown_target", "bad_config_json", "oversize", "wrong_base", "archive_escape"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_and_nothing_is_stored(case, store, spec, peft_folder, tmp_path):
    tenant, _ = store.tenants.create("acme")
    payload, error, message = _bad_payload(case, tmp_path, spec, peft_folder)
    with pytest.raises(error, match=message):
        store.put(tenant, "d", payload)
    assert_nothing_stored(store, tenant)


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", "a..b", ".hidden", "", "x" * 129, "sp ace", "é"])
def test_bad_names_are_refused(store, spec, tmp_path, name):
    tenant, _ = store.tenants.create("acme")
    with pytest.raises(InvalidArgument, match="invalid"):
        store.put(tenant, name, _native(tmp_path, random_delta(spec)))
    assert_nothing_stored(store, tenant)
    with pytest.raises(InvalidArgument):
        store.resolve(tenant, name)


def test_quotas_on_put(store, spec, tmp_path):
    tenant, _ = store.tenants.create("small")
    f = _native(tmp_path, random_delta(spec, rank=2))
    size = store.put(tenant, "one", f).size
    store.tenants.set_quotas(tenant.id, max_deltas=1, max_bytes=2 * size)
    store.put(tenant, "one", f)  # a new version of an existing name is not a new delta
    with pytest.raises(ResourceExhausted, match="delta quota"):
        store.put(tenant, "two", f)
    store.tenants.set_quotas(tenant.id, max_deltas=5)
    with pytest.raises(ResourceExhausted, match="storage quota"):
        store.put(tenant, "two", f)
    assert [v.name for v in store.list(tenant)[0]] == ["one"]


@pytest.mark.parametrize("container", ["safetensors", "torch"])
def test_bitfit_file_spooled_without_a_suffix(store, spec, tmp_path, container):
    """The gRPC edge spools uploads to nameless temp files: the store finds the container by content."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    paths = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    biases = {f"{p}.bias": torch.randn(spec.modules[p].out_features, generator=g) for p in paths}
    spooled = tmp_path / "upload-1234"
    if container == "safetensors":
        save_file(biases, spooled)
    else:
        torch.save(biases, spooled)  # a zip container: must not be taken for an archive upload
    tenant, _ = store.tenants.create("acme")
    version = store.put(tenant, "bias-only", spooled)
    assert version.kinds == ("bitfit",) and version.source_format == "bitfit"
    store.host.discard(version.digest)
    delta = store.load(version)
    for p in paths:  # the tiny Llama's linears have no base bias: absolute values are the deltas
        assert torch.equal(delta.modules[p].bias, biases[f"{p}.bias"])
    assert list((store.data_dir / "tmp").iterdir()) == []
