"""S3 blobs against moto's standalone server on loopback: layout, multipart, sha256 on every load,
the per-replica disk cache, sweeps of dead uploads, and one-line errors for a store that is not there."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from delta_store.blob_cache import BlobCache
from delta_store.errors import CorruptBlob, FailedPrecondition, InvalidArgument, Unavailable
from delta_store.s3_blobs import S3Blobs, parse_s3_url
from tests.services import free_port


def blob(n: int, seed: int) -> tuple[str, bytes]:
    data = hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"x" * (n % 32)
    return hashlib.sha256(data).hexdigest(), data


class Calls:
    """Counts the S3 operations a client sends (botocore's before-call event)."""

    def __init__(self, client):
        self.names: list[str] = []
        client.meta.events.register("before-call.s3", lambda model, **_: self.names.append(model.name))

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


@pytest.fixture
def s3(moto_s3):
    client = moto_s3.client()
    return S3Blobs(moto_s3.bucket(), "team/a/", client=client, multipart_threshold=5 << 20, part_bytes=5 << 20)


def test_url_parsing():
    assert parse_s3_url("s3://deltas/prod/eu/") == ("deltas", "prod/eu/")
    assert parse_s3_url("s3://deltas") == ("deltas", "")
    for bad in ("deltas/prod", "s3://", "s3://UPPER/x", "s3://a/x", "http://deltas/x"):
        with pytest.raises(InvalidArgument):
            parse_s3_url(bad)


def test_round_trip_layout_idempotent_put_and_multipart(s3):
    small_digest, small = blob(1000, 1)
    large_digest, large = blob(11 << 20, 2)  # 11 MiB over a 5 MiB threshold: three parts
    calls = Calls(s3.client)
    s3.put(small_digest, small)
    s3.put(large_digest, large)
    assert "CreateMultipartUpload" in calls.names and calls.names.count("UploadPart") == 3
    head = s3.client.head_object(Bucket=s3.bucket, Key=f"team/a/blobs/{large_digest[:2]}/{large_digest}")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(large)
    calls.take()
    s3.put(small_digest, small)  # content-addressed: the same bytes are not sent twice
    assert calls.take() == ["HeadObject"]
    assert sorted(s3.iter()) == sorted([small_digest, large_digest])
    assert s3.get(large_digest) == large and s3.get(small_digest) == small
    assert s3.exists(small_digest) and abs(s3.mtime(small_digest) - time.time()) < 120
    with pytest.raises(InvalidArgument, match="do not hash"):
        s3.put(small_digest, small + b"!")
    s3.delete(small_digest)
    assert not s3.exists(small_digest) and list(s3.iter()) == [large_digest]
    with pytest.raises(CorruptBlob, match="missing from s3://"):
        s3.get(small_digest)
    with pytest.raises(FileNotFoundError):
        s3.mtime(small_digest)


def test_an_altered_object_is_refused_never_served_nor_cached(s3, tmp_path):
    s3.cache = BlobCache(tmp_path / "cache", 1 << 20)
    digest, data = blob(4000, 3)
    s3.put(digest, data)
    s3.cache.discard(digest)
    flipped = bytearray(data)
    flipped[2000] ^= 0x01
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key(digest), Body=bytes(flipped))
    with pytest.raises(CorruptBlob, match="corrupt in s3://"):
        s3.get(digest)
    assert s3.cache.stats().entries == 0


def test_disk_cache_saves_fetches_stays_bounded_and_rehashes(s3, tmp_path):
    blobs = [blob(3000, 10 + i) for i in range(3)]
    for digest, data in blobs:
        s3.put(digest, data)
    s3.cache = BlobCache(tmp_path / "cache", 7000)  # two of the three 3000-byte blobs
    calls = Calls(s3.client)
    for digest, data in blobs:
        assert s3.get(digest) == data
    assert calls.take().count("GetObject") == 3
    assert s3.cache.stats().bytes == 6000, "the least recently used one was evicted"
    assert s3.get(blobs[2][0]) == blobs[2][1] and s3.get(blobs[1][0]) == blobs[1][1]
    assert "GetObject" not in calls.take(), "cached blobs are read from local disk"
    assert s3.get(blobs[0][0]) == blobs[0][1] and "GetObject" in calls.take()
    # a bad local disk shows up as a miss, never as wrong bytes
    path = tmp_path / "cache" / blobs[0][0][:2] / blobs[0][0]
    path.write_bytes(b"\0" + path.read_bytes()[1:])
    assert s3.get(blobs[0][0]) == blobs[0][1] and "GetObject" in calls.take()
    assert s3.cache.stats().rejected == 1
    # a restarted replica finds its cache again, in LRU order
    again = BlobCache(tmp_path / "cache", 7000)
    assert again.stats().entries == 2 and again.get(blobs[0][0]) == blobs[0][1]
    s3.delete(blobs[0][0])
    assert s3.cache.get(blobs[0][0]) is None, "a collected blob leaves the cache too"


def test_dead_writers_multipart_uploads_are_aborted_after_the_grace(s3):
    digest, _ = blob(100, 20)
    s3.client.create_multipart_upload(Bucket=s3.bucket, Key=s3.key(digest))
    s3.client.create_multipart_upload(Bucket=s3.bucket, Key="elsewhere/" + digest)  # not ours: kept
    # moto reports every upload as initiated in 2010: the grace is measured from what the store says
    initiated = s3.client.list_multipart_uploads(Bucket=s3.bucket)["Uploads"][0]["Initiated"].timestamp()
    assert s3.abort_stale_uploads(time.time() - initiated + 3600) == 0, "a young upload's writer may still be sending parts"
    assert s3.abort_stale_uploads(0) == 1
    left = s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["elsewhere/" + digest]


def test_a_store_that_is_not_there_fails_with_one_line(moto_s3, monkeypatch):
    with pytest.raises(FailedPrecondition, match="bucket 'no-such-bucket' does not exist"):
        S3Blobs("no-such-bucket", client=moto_s3.client()).check()
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    dead = S3Blobs.from_url("s3://deltas/x")
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"blob store s3://deltas/x/ unreachable during HeadBucket") as err:
        dead.check()
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 10
    with pytest.raises(Unavailable, match="unreachable during download"):
        dead.get(blob(10, 1)[0])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(FailedPrecondition, match="no S3 credentials"):
        S3Blobs.from_url("s3://deltas/x").check()
