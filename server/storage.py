"""The catalogue and the blob store a ``ServerConfig`` names, opened and checked before the model loads.

    catalogue = ""               -> SQLite at <data_dir>/catalogue.sqlite3 (one process, one host)
    catalogue = postgresql://... -> PostgreSQL, shared by every replica (D12)
    blobs = ""                   -> content-addressed files under <data_dir>/blobs
    blobs = s3://bucket/prefix   -> an S3-compatible store, shared; a disk cache of blob_cache_bytes
                                    under <data_dir>/blob-cache, per replica

Both are reached at start-up (PostgreSQL: connect and migrate; S3: HeadBucket), so a replica that
cannot use them stops within seconds with one line naming which and why, instead of loading a model
for minutes and then failing every request. ``build_app`` logs what was opened once the replica is built
(a failed start says one line, nothing else).
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

from delta_store.blob_cache import BlobCache
from delta_store.blobs import LocalBlobs
from delta_store.catalogue import Catalogue
from delta_store.s3_blobs import S3Blobs

from .config import ServerConfig

CATALOGUE_FILE = "catalogue.sqlite3"
BLOB_CACHE_DIR = "blob-cache"


def replica_id(config: ServerConfig) -> str:
    """``config.replica_id``, or this host's name (a pod's name in Kubernetes) made header-safe."""
    return config.replica_id or re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:128] or "replica"


def open_catalogue(config: ServerConfig, busy_timeout_s: float) -> Catalogue:
    target = config.catalogue or Path(config.data_dir) / CATALOGUE_FILE
    return Catalogue(target, busy_timeout_s=busy_timeout_s)  # connects and migrates: fails here if it cannot


def open_blobs(config: ServerConfig):
    if not config.blobs:
        return LocalBlobs(config.data_dir)
    cache = BlobCache(Path(config.data_dir) / BLOB_CACHE_DIR, config.blob_cache_bytes)
    blobs = S3Blobs.from_url(config.blobs, cache=cache)
    blobs.check()
    return blobs


def describe_blobs(blobs) -> str:
    return getattr(blobs, "where", None) or f"files {getattr(blobs, 'root', '?')}"
