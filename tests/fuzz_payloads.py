"""Upload payloads of every accepted format for the fixture Llama base, and the mutations the upload fuzz test
sends (tests/test_edge_fuzz.py): truncations, bit flips and random bytes.

Every mutation here must be refused, so each one breaks something the format itself lets a reader check:
  * truncation: any strict prefix (archives are read to their end, so a cut trailer is seen too);
  * bit flips, in the bytes a format protects: the deflate stream and CRC trailer of gzip (not its flag,
    mtime, XFL and OS bytes, which readers do not check), the member data of zip files (CRC-32), and the structure of a
    safetensors header (its length prefix and every JSON byte outside string contents: punctuation, shapes,
    offsets, quotes). A flip inside tensor values or a name string can make another valid delta, which a
    server must accept; those are not sent.
  * random bytes, bare or behind the magic numbers of each container.
"""
from __future__ import annotations

import gzip
import io
import json
import random
import struct
import tarfile
import zipfile
from pathlib import Path

import torch

from tests.helpers import FIXTURES

ADAPTERHUB = ("llama-lora", "llama-seq_bn", "llama-ia3")
OPENDELTA = ("llama-lora", "llama-adapter", "llama-bitfit")
LIBRARY_FILES = {"adapterhub": ("adapter_config.json", "pytorch_adapter.bin", "head_config.json",
                                "pytorch_model_head.bin"), "opendelta": ("config.json", "pytorch_model.bin")}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(files.items()):
            zf.writestr(name, data)
    return buf.getvalue()


def folder_files(folder: Path, names=None) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and (names is None or p.name in names)}


def valid_payloads(model_dir: Path, spec) -> dict[str, bytes]:
    """name -> bytes of one valid upload of each format and container, for the base at ``model_dir``."""
    from safetensors.torch import save

    from delta_store.native import dump_native
    from tests.helpers import random_delta
    from tests.server_harness import peft_lora

    peft_tgz, _ = peft_lora(model_dir, seed=21)
    with tarfile.open(fileobj=io.BytesIO(peft_tgz)) as tar:
        peft_files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    out = {"peft.tar.gz": peft_tgz, "peft.zip": zip_of(peft_files)}
    for case in ADAPTERHUB:
        out[f"adapterhub-{case}.tar.gz"] = tar_gz(folder_files(FIXTURES / "adapterhub" / case, LIBRARY_FILES["adapterhub"]))
    for case in OPENDELTA:
        out[f"opendelta-{case}.zip"] = zip_of(folder_files(FIXTURES / "opendelta" / case, LIBRARY_FILES["opendelta"]))
    out["native.safetensors"] = dump_native(random_delta(spec, rank=4, seed=3, bias=True))
    g = torch.Generator().manual_seed(4)
    biases = {f"{p}.bias": 0.01 * torch.randn(spec.modules[p].out_features, generator=g)
              for p in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj")}
    out["bitfit.safetensors"] = save(biases)
    buf = io.BytesIO()
    torch.save(biases, buf)
    out["bitfit.bin"] = buf.getvalue()
    return out


# ---- where a flip must be detected ------------------------------------------------------------------
def protected_positions(data: bytes) -> list[int]:
    """Byte offsets of ``data`` whose every bit the format protects (see the module docstring)."""
    if data[:2] == b"\x1f\x8b":
        return [i for i in range(len(data)) if not 3 <= i <= 9]  # gzip: FLG hints, MTIME, XFL, OS are not checked
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            spans = []
            for info in zf.infolist():
                if info.compress_size == 0:
                    continue
                name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
                start = info.header_offset + 30 + name_len + extra_len
                spans.extend(range(start, start + info.compress_size))  # member data, CRC-32 checked
            return spans
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n]
    positions, inside, escaped = list(range(8)), False, False
    for i, ch in enumerate(header.decode("utf-8")):  # the safetensors header is ASCII JSON
        if inside:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inside = False
                positions.append(8 + i)
            continue
        if ch == '"':
            inside = True
        if ch != " ":
            positions.append(8 + i)
    return positions


def mutations(payloads: dict[str, bytes], rng: random.Random, *, cuts: int = 10, flips: int = 16,
              randoms: int = 60) -> list[tuple[str, bytes]]:
    """(case id, bytes) pairs: ``cuts`` truncations and ``flips`` bit flips of each payload, ``randoms`` random ones."""
    cases = []
    for name, data in payloads.items():
        lengths = {0, 1, len(data) - 1} | {rng.randrange(1, len(data)) for _ in range(cuts - 3)}
        cases += [(f"{name}/cut@{n}", data[:n]) for n in sorted(lengths)]
        where = protected_positions(data)
        for _ in range(flips):
            pos, bit = rng.choice(where), rng.randrange(8)
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            cases.append((f"{name}/flip@{pos}.{bit}", bytes(flipped)))
    magics = (b"", b"PK\x03\x04", b"\x1f\x8b\x08\x00", b"BZh9", b"\xfd7zXZ\x00",
              struct.pack("<Q", 64) + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}')
    for k in range(randoms):
        magic = magics[k % len(magics)]
        body = rng.randbytes(rng.choice((1, 17, 512, 4096, 70_000)))
        cases.append((f"random{k}-{magic[:4].hex() or 'bare'}", magic + body))
    # a tar whose members claim more than they hold, and one with a member past the declared total
    lying = bytearray(tar_gz({"adapter_config.json": json.dumps({"peft_type": "LORA"}).encode()}))
    cases.append(("tar.gz/lying-size", gzip.compress(_lying_tar())))
    cases.append(("tar.gz/cut-trailer", bytes(lying[:-4])))
    return cases


def _lying_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"0123456789"))
    raw = bytearray(buf.getvalue())
    raw[124:136] = b"%011o\0" % (1 << 30)  # the header now claims 1 GiB; the checksum no longer matches
    return bytes(raw)
