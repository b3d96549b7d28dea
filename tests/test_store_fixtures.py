"""Parity through the store for AdapterHub and OpenDelta (tests/fixtures/README.md): each fixture folder
is uploaded as an archive (tar.gz or zip, as a tenant would), stored as a native blob, loaded back from
disk, and served in one packed batch; every row must equal the producing library's logits (fp32, 1e-5)."""
from __future__ import annotations

import tarfile
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from delta_store import BaseSpec, DeltaStore
from delta_store.validate import Limits
from server.deltas import wrap_model
from tests.helpers import FIXTURES, assert_close, fixture_cases, store_settings


def pack(case, out, kind):
    if kind == "zip":
        path = out / f"{case.parent.name}-{case.name}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(case.iterdir()):
                zf.write(f, f"{case.name}/{f.name}")
    else:
        path = out / f"{case.parent.name}-{case.name}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(case, arcname=case.name)
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fixture_archives_through_the_store_equal_the_libraries(arch, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / arch, dtype=torch.float32).eval()
    spec = BaseSpec.from_model(base)
    cases = fixture_cases(arch, prompt=False)  # prompt cases: tests/test_formats_prompt_fixtures.py
    assert len(cases) >= 4
    dm = wrap_model(base, max_slots=len(cases), max_rank=16, max_bottleneck=64)
    ids, expected, slots, names = [], [], [], []
    with DeltaStore.open(tmp_path / "data", spec, Limits(max_rank=16, max_bottleneck=64), store_settings()) as store:
        tenant, _ = store.tenants.create("t")
        for slot, case in enumerate(cases):
            archive = pack(case, tmp_path, "zip" if slot % 2 else "tgz")
            version = store.put(tenant, f"{case.parent.name}-{case.name}", archive)
            assert version.source_format == case.parent.name
            store.host.discard(version.digest)
            dm.set_delta(slot, store.load_key(version.key))  # from the blob on disk, digest verified
            exp = load_file(case / "expected.safetensors")
            ids.append(exp["input_ids"])
            expected.append(exp["logits"])
            slots += [slot] * exp["input_ids"].shape[0]
            names += [version.name] * exp["input_ids"].shape[0]
        assert store.stats().disk_loads == len(cases)
    ids, expected = torch.cat(ids), torch.cat(expected)  # [rows, 11], [rows, 11, vocab]
    dm.batch.prepare_sequences(slots, [ids.shape[1]] * len(slots))
    with torch.no_grad():
        got = dm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    for row, name in enumerate(names):
        assert_close(got[row], expected[row], atol=1e-5, what=f"{arch} row {row} ({name})")
