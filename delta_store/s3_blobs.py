"""Blobs in an S3-compatible object store: ``s3://bucket/prefix`` holds ``<prefix>blobs/ab/abcdef...``.

The same content-addressed layout as :class:`LocalBlobs` (an ``aws s3 sync`` of the prefix is a
valid local data dir). Only the standard S3 API is used (PutObject, multipart upload, GetObject,
HeadObject, DeleteObject, ListObjectsV2, ListMultipartUploads, HeadBucket), with botocore's newer
default CRC checksums turned off ("when_required"), so AWS S3, MinIO, Ceph RGW, R2 and moto all work
unchanged. Endpoint, region and credentials come from the standard AWS chain (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws/config``, instance roles).

Atomicity comes from the store: an object appears whole or not at all, a multipart upload only on
CompleteMultipartUpload. Blobs of ``multipart_threshold`` bytes or more travel as parts of
``part_bytes`` (parallel, retried per part). Every ``get`` re-hashes the bytes, as for local blobs;
a bounded :class:`BlobCache` on local disk (per replica) saves the fetch of a blob read before.
"""
from __future__ import annotations

import hashlib
import io
import re
import time
from typing import Iterator

from .blob_cache import BlobCache
from .blobs import DIGEST_RE, _check_digest
from .errors import CorruptBlob, FailedPrecondition, InvalidArgument, Unavailable

MULTIPART_THRESHOLD = 16 << 20  # bytes; below it one PutObject (S3's minimum part size is 5 MiB)
PART_BYTES = 16 << 20
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload")


class _Missing(Exception):
    """The object (or bucket) is not there: each caller says what that means for it."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``); the prefix may be empty."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise InvalidArgument(f"blob store {url!r} is not an s3://bucket/prefix URL")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise InvalidArgument(f"blob store {url!r}: {bucket!r} is not a valid S3 bucket name")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


def s3_client(**overrides):
    """A boto3 S3 client from the standard environment/config, with timeouts a request can wait for."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    max_pool_connections=32)
    return boto3.session.Session().client("s3", config=config, **overrides)


class S3Blobs:
    def __init__(self, bucket: str, prefix: str = "", *, client=None, cache: BlobCache | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_bytes: int = PART_BYTES):
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix
        self.client = client if client is not None else s3_client()
        self.cache = cache
        self.where = f"s3://{bucket}/{prefix}"
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=part_bytes,
                                        max_concurrency=4, use_threads=True)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> "S3Blobs":
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    def key(self, digest: str) -> str:
        _check_digest(digest)
        return f"{self.prefix}blobs/{digest[:2]}/{digest}"

    # -- errors ---------------------------------------------------------------------------------------
    def _error(self, exc: Exception, action: str) -> Exception:
        """A botocore error -> the typed error a request should end with (one line, naming the store)."""
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return FailedPrecondition(f"blob store {self.where}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                                      f"AWS_SECRET_ACCESS_KEY, or a profile)")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code, status = str(err.get("Code", "")), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            text = f"blob store {self.where}: {action} failed: {code or status} {err.get('Message', '')}".rstrip()
            return Unavailable(text) if status >= 500 or code in ("SlowDown", "RequestTimeout") else FailedPrecondition(text)
        return Unavailable(f"blob store {self.where} unreachable during {action}: {exc}")

    def _call(self, action: str, fn, *args, **kwargs):
        """``fn(...)``; a missing object raises :class:`_Missing`, any other S3 error its typed error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _MISSING:
                raise _Missing() from None
            raise self._error(exc, action) from exc

    def _pages(self, action: str, operation: str, **kwargs) -> Iterator[dict]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield from self.client.get_paginator(operation).paginate(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, action) from exc

    # -- BlobBackend ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Start-up check: the bucket exists and these credentials may read it (HeadBucket)."""
        try:
            self._call("HeadBucket", self.client.head_bucket, Bucket=self.bucket)
        except _Missing:
            raise FailedPrecondition(f"blob store {self.where}: bucket {self.bucket!r} does not exist") from None

    def put(self, digest: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != _check_digest(digest):
            raise InvalidArgument(f"blob put: bytes do not hash to {digest[:12]}")
        size = self._size(digest)
        if size == len(data):
            return  # same name, same content: already stored (a corrupt one is caught on get)
        self._call("upload", self.client.upload_fileobj, io.BytesIO(data), self.bucket, self.key(digest),
                   Config=self._transfer)
        if self.cache is not None:
            self.cache.put(digest, data)

    def _size(self, digest: str) -> int | None:
        try:
            head = self._call("HeadObject", self.client.head_object, Bucket=self.bucket, Key=self.key(digest))
        except _Missing:
            return None
        return int(head["ContentLength"])

    def get(self, digest: str) -> bytes:
        if self.cache is not None:
            data = self.cache.get(_check_digest(digest))
            if data is not None:
                return data
        buf = io.BytesIO()
        try:
            self._call("download", self.client.download_fileobj, self.bucket, self.key(digest), buf,
                       Config=self._transfer)
        except _Missing:
            raise CorruptBlob(f"blob {digest[:12]} is missing from {self.where}") from None
        data = buf.getvalue()
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CorruptBlob(f"blob {digest[:12]} is corrupt in {self.where}: its bytes hash to {actual[:12]}")
        if self.cache is not None:
            self.cache.put(digest, data)
        return data

    def exists(self, digest: str) -> bool:
        return self._size(digest) is not None

    def delete(self, digest: str) -> None:
        if self.cache is not None:
            self.cache.discard(digest)
        self._call("DeleteObject", self.client.delete_object, Bucket=self.bucket, Key=self.key(digest))

    def iter(self) -> Iterator[str]:
        for page in self._pages("ListObjectsV2", "list_objects_v2", Prefix=f"{self.prefix}blobs/"):
            for obj in page.get("Contents", ()):
                name = obj["Key"].rpartition("/")[2]
                if DIGEST_RE.fullmatch(name) and obj["Key"] == self.key(name):
                    yield name

    def mtime(self, digest: str) -> float:
        try:
            head = self._call("HeadObject", self.client.head_object, Bucket=self.bucket, Key=self.key(digest))
        except _Missing:
            raise FileNotFoundError(self.key(digest)) from None
        return head["LastModified"].timestamp()

    def abort_stale_uploads(self, grace_s: float) -> int:
        """Abort multipart uploads under the prefix started more than ``grace_s`` ago: the parts of a writer
        that died mid-upload (invisible as objects, but billed). A bucket lifecycle rule
        ``AbortIncompleteMultipartUpload`` does the same on the store's side."""
        removed = 0
        now = time.time()
        for page in self._pages("ListMultipartUploads", "list_multipart_uploads", Prefix=f"{self.prefix}blobs/"):
            for upload in page.get("Uploads", ()):
                if now - upload["Initiated"].timestamp() > grace_s:
                    try:
                        self._call("AbortMultipartUpload", self.client.abort_multipart_upload, Bucket=self.bucket,
                                   Key=upload["Key"], UploadId=upload["UploadId"])
                    except _Missing:
                        continue  # another replica's sweep aborted it first
                    removed += 1
        return removed
