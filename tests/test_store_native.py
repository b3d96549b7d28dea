"""Native format: deterministic bytes, exact round trip of every term, malformed files refused."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load

from delta_store.delta import AdapterTerm, Delta, LoraTerm, ModuleDelta
from delta_store.errors import DeltaError
from delta_store.native import FORMAT_NAME, digest_bytes, dump_native, load_native, read_header, sniff_native


def every_kind_delta() -> Delta:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return Delta({
        "model.layers.0.self_attn.q_proj": ModuleDelta(lora=LoraTerm(r(4, 8), r(8, 4), 0.25), bias=r(8)),
        "model.layers.0.mlp.up_proj": ModuleDelta(in_scale=r(8), out_scale=r(16).half()),
        "model.layers.0.mlp.down_proj": ModuleDelta(adapter=AdapterTerm(r(3, 8), r(3), r(8, 3), r(8), "gelu_new",
                                                                        4.0, "residual")),
        "model.layers.1.self_attn.o_proj": ModuleDelta(bias=r(8).to(torch.bfloat16)),
    }, source_format="peft", base_fingerprint="abc123", description="every kind")


def assert_same(a: Delta, b: Delta) -> None:
    assert (a.source_format, a.base_fingerprint, a.description) == (b.source_format, b.base_fingerprint, b.description)
    assert a.modules.keys() == b.modules.keys()
    for path in a.modules:
        ma, mb = a.modules[path], b.modules[path]
        ta, tb = ma.tensors(), mb.tensors()
        assert ta.keys() == tb.keys(), path
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{path}.{k}"
        assert (ma.lora and ma.lora.scale) == (mb.lora and mb.lora.scale)
        if ma.adapter:
            assert (ma.adapter.activation, ma.adapter.scale, ma.adapter.source) == \
                   (mb.adapter.activation, mb.adapter.scale, mb.adapter.source)


def test_round_trip_is_exact_and_bytes_deterministic(tmp_path):
    delta = every_kind_delta()
    data = dump_native(delta)
    assert data == dump_native(every_kind_delta())  # same delta built again, same bytes
    back = load_native(data)
    assert_same(delta, back)
    assert digest_bytes(dump_native(back)) == digest_bytes(data)
    # an ordinary safetensors reader sees the tensors and our metadata
    assert set(st_load(data)) == {f"{p}.{s}" for p, md in delta.modules.items() for s in md.tensors()}
    assert read_header(data)["__metadata__"]["format"] == FORMAT_NAME
    f = tmp_path / "d.bin"
    f.write_bytes(data)
    assert sniff_native(f)
    assert_same(delta, load_native(f))


def test_module_order_does_not_change_bytes():
    delta = every_kind_delta()
    reordered = Delta(dict(reversed(list(delta.modules.items()))), delta.source_format, delta.base_fingerprint,
                      delta.description)
    assert dump_native(reordered) == dump_native(delta)


def _rewrite_config(data: bytes, edit) -> bytes:
    header = read_header(data)
    cfg = json.loads(header["__metadata__"]["deltaserve"])
    edit(cfg)
    header["__metadata__"]["deltaserve"] = json.dumps(cfg)
    (size,) = struct.unpack("<Q", data[:8])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data[8 + size:]


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated or corrupt"),
    ("short", "too short"),
    ("tail_cut", "corrupt safetensors data"),
    ("header_garbage", "not valid JSON"),
    ("future_version", "version 2 is not supported"),
    ("bad_config_json", "not valid JSON"),
    ("not_native", "not a native delta"),
    ("undescribed_tensor", "not described"),
    ("rank_mismatch", "does not match"),
    ("nan_scale", "finite number"),
    ("bad_activation", "not supported"),
])
def test_malformed_native_files_are_refused(case, message):
    data = dump_native(every_kind_delta())
    (size,) = struct.unpack("<Q", data[:8])
    q = "model.layers.0.self_attn.q_proj"
    bad = {
        "truncated": lambda: data[:8 + size // 2],
        "short": lambda: data[:5],
        "tail_cut": lambda: data[:-7],
        "header_garbage": lambda: data[:8] + b"{" * size + data[8 + size:],
        "future_version": lambda: _rewrite_config(data, lambda c: c.update(format_version=2)),
        "bad_config_json": lambda: _set_meta(data, "deltaserve", "{not json"),
        "not_native": lambda: _set_meta(data, "format", "something-else"),
        "undescribed_tensor": lambda: _rewrite_config(data, lambda c: c["modules"].pop(q)),
        "rank_mismatch": lambda: _rewrite_config(data, lambda c: c["modules"][q]["lora"].update(rank=5)),
        "nan_scale": lambda: _rewrite_config(data, lambda c: c["modules"][q]["lora"].update(scale="nan")),
        "bad_activation": lambda: _rewrite_config(
            data, lambda c: c["modules"]["model.layers.0.mlp.down_proj"]["adapter"].update(activation="tanh")),
    }[case]()
    with pytest.raises(DeltaError, match=message):
        load_native(bad)


def _set_meta(data: bytes, key: str, value: str) -> bytes:
    header = read_header(data)
    header["__metadata__"][key] = value
    (size,) = struct.unpack("<Q", data[:8])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data[8 + size:]


def test_missing_file_and_unstorable_values(tmp_path):
    with pytest.raises(DeltaError, match="no such file"):
        load_native(tmp_path / "nope.safetensors")
    delta = every_kind_delta()
    delta.modules["model.layers.0.self_attn.q_proj"].lora.scale = float("inf")
    with pytest.raises(DeltaError, match="not finite"):
        dump_native(delta)
    with pytest.raises(DeltaError, match="not storable"):
        dump_native(Delta({"m": ModuleDelta(bias=torch.ones(3, dtype=torch.int32))}))
