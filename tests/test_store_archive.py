"""Archive extraction refuses every escape and bomb before writing anything."""
from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from delta_store.archive import archive_kind, extract_archive
from delta_store.errors import DeltaError

LIMITS = dict(max_members=10, max_bytes=10_000)


def make_tar(path, members, mode="w:gz"):
    """members: list of (TarInfo-ish kwargs, data bytes or None)."""
    with tarfile.open(path, mode) as tar:
        for spec, data in members:
            info = tarfile.TarInfo(spec.pop("name"))
            for k, v in spec.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_tar_gz_and_zip_extract_the_adapter_folder(tmp_path):
    files = {"adapter/adapter_config.json": b"{}", "adapter/adapter_model.safetensors": b"x" * 100}
    tgz = make_tar(tmp_path / "a.tgz", [({"name": "adapter", "type": tarfile.DIRTYPE}, None)] +
                   [({"name": n}, d) for n, d in files.items()])
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)
    for archive, kind in ((tgz, "tar"), (z, "zip")):
        assert archive_kind(archive) == kind
        folder = extract_archive(archive, tmp_path / f"out-{kind}", **LIMITS)
        assert folder.name == "adapter"
        assert (folder / "adapter_model.safetensors").read_bytes() == b"x" * 100
    flat = make_tar(tmp_path / "flat.tar", [({"name": "adapter_config.json"}, b"{}")], mode="w")
    assert extract_archive(flat, tmp_path / "out-flat", **LIMITS) == tmp_path / "out-flat"


@pytest.mark.parametrize("member, message", [
    ({"name": "/etc/evil"}, "absolute path"),
    ({"name": "a/../../evil"}, "'..'"),
    ({"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "link"),
    ({"name": "hard", "type": tarfile.LNKTYPE, "linkname": "adapter_config.json"}, "link"),
    ({"name": "dev", "type": tarfile.CHRTYPE}, "device"),
    ({"name": "fifo", "type": tarfile.FIFOTYPE}, "device"),
])
def test_tar_escapes_are_refused_before_writing(tmp_path, member, message):
    data = b"x" if member.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else None
    archive = make_tar(tmp_path / "bad.tgz", [({"name": "adapter_config.json"}, b"{}"), (dict(member), data)])
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match=message):
        extract_archive(archive, out, **LIMITS)
    assert not any(out.rglob("*")), "nothing may be written when any member is refused"
    assert not (tmp_path / "evil").exists()


def test_member_count_and_size_limits(tmp_path):
    many = make_tar(tmp_path / "many.tgz", [({"name": f"f{i}"}, b"x") for i in range(11)])
    with pytest.raises(DeltaError, match="more than 10 members"):
        extract_archive(many, tmp_path / "o1", **LIMITS)
    big = make_tar(tmp_path / "big.tgz", [({"name": "a"}, b"\0" * 6000), ({"name": "b"}, b"\0" * 6000)])
    with pytest.raises(DeltaError, match="more than 10000 bytes"):
        extract_archive(big, tmp_path / "o2", **LIMITS)
    assert not any((tmp_path / "o2").rglob("*"))
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("weights.bin", b"\0" * 50_000)  # compresses to ~100 bytes
    with pytest.raises(DeltaError, match="more than 10000 bytes"):
        extract_archive(z, tmp_path / "o3", **LIMITS)


def test_zip_escapes_and_symlinks_are_refused(tmp_path):
    for name, attr, message in (("../evil", 0o100644, "'..'"), ("/abs", 0o100644, "absolute"),
                                ("c:/x", 0o100644, "absolute"), ("lnk", 0o120777, "link")):
        z = tmp_path / "bad.zip"
        with zipfile.ZipFile(z, "w") as zf:
            info = zipfile.ZipInfo(name)
            info.external_attr = attr << 16
            zf.writestr(info, b"data")
        with pytest.raises(DeltaError, match=message):
            extract_archive(z, tmp_path / "out", **LIMITS)


def test_not_an_archive_and_torch_checkpoints(tmp_path):
    import torch

    f = tmp_path / "weights.bin"
    torch.save({"x": torch.ones(2)}, f)
    assert archive_kind(f) is None  # torch.save writes a zip, but it is a weights file
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 1000)
    assert archive_kind(junk) is None
    with pytest.raises(DeltaError, match="not a tar or zip"):
        extract_archive(junk, tmp_path / "o", **LIMITS)
    cut = tmp_path / "cut.tgz"
    whole = make_tar(tmp_path / "whole.tgz", [({"name": "a"}, bytes(range(256)) * 20)]).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DeltaError):
        extract_archive(cut, tmp_path / "o4", **LIMITS)
