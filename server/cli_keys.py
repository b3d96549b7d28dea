"""Where the CLI finds the admin key of a server on this machine, and whether a key still works."""
from __future__ import annotations

import os
from pathlib import Path

from .admin_key import key_path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0")


def default_data_dir() -> Path:
    from .config import ServerConfig

    return Path(os.environ.get("DELTASERVE_DATA_DIR", ServerConfig().data_dir))


def local_key_files(args) -> list[Path]:
    """Where a server on this machine keeps its admin key, in the order tried: DELTASERVE_DATA_DIR's, the
    data dir the server on that port noted (server/discovery.py), ./.deltaserve's. Empty for a remote server."""
    host, _, port = args.server.rpartition(":")
    if host not in LOCAL_HOSTS:
        return []
    from .discovery import data_dir_of

    dirs = []
    if os.environ.get("DELTASERVE_DATA_DIR"):
        dirs.append(Path(os.environ["DELTASERVE_DATA_DIR"]))
    noted = data_dir_of(int(port)) if port.isdigit() else None
    if noted is not None:
        dirs.append(noted)
    dirs.append(default_data_dir())
    return list(dict.fromkeys(key_path(d) for d in dirs))


def local_key_file(args) -> Path | None:
    """The key file the CLI's ``_api_key`` reads when no key is given: the first of those that exists."""
    return next((f for f in local_key_files(args) if f.is_file()), None)


def key_works(client, key: str) -> bool:
    """False when the server says UNAUTHENTICATED to ``key`` (a rotation revoked it); other errors raise."""
    import grpc

    try:
        client.with_key(key).list_deltas(page_size=1)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return False
        raise
    return True
