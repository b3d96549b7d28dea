"""The admin key file, ``<data_dir>/admin.key`` (mode 0600): written at the first start, kept in step when the
CLI rotates the key it holds, and re-issued offline when it is lost.

    first start, empty catalogue      App.ensure_admin: tenant "admin", its key written here
    deltaserve tenants rotate-key X   the CLI rewrites the file when the rotation revoked the key it held
    deltaserve recover-admin-key      server stopped: a new key for the admin tenant, straight in the catalogue

Writes are atomic (a temp file under ``<data_dir>/tmp``, which the server's start-up sweep clears, then
fsync and rename): a crash leaves the old key or the new one, never half a key. Light on imports (the CLI
imports this module; ``recover`` alone opens the catalogue, lazily).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

KEY_FILE = "admin.key"
ADMIN_TENANT = "admin"


class RecoveryRefused(RuntimeError):
    """The offline recovery cannot run (a server holds the data dir, or the tenant is not an admin)."""


def key_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / KEY_FILE


def read_key(data_dir: str | os.PathLike) -> str | None:
    path = key_path(data_dir)
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_key(data_dir: str | os.PathLike, key: str) -> Path:
    """Replace ``<data_dir>/admin.key`` with ``key``, atomically, mode 0600."""
    data_dir = Path(data_dir)
    tmp_dir = data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="admin-key-", dir=tmp_dir)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, key_path(data_dir))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return key_path(data_dir)


def recover(data_dir: str | os.PathLike, tenant: str = ADMIN_TENANT, *, catalogue: str = "") -> tuple[Path, bool]:
    """Offline: give admin tenant ``tenant`` a new key (creating it as an admin if it does not exist) and
    write it to the key file. ``catalogue``: the server's catalogue URL when it is not SQLite in the data
    dir (a PostgreSQL catalogue shared by replicas: the new key holds on every replica at once, the others
    may keep running). Refused while a server (any store) holds ``data_dir``. Returns (key file, created).
    The old key of the tenant stops working; other tenants are untouched."""
    from delta_store.catalogue import Catalogue
    from delta_store.errors import NotFound
    from delta_store.scratch import live_owners
    from delta_store.tenants import TenantRegistry

    from .app import store_config
    from .config import ServerConfig
    from .storage import CATALOGUE_FILE

    data_dir = Path(data_dir)
    target = catalogue or data_dir / CATALOGUE_FILE
    if not catalogue and not Path(target).is_file():
        raise RecoveryRefused(f"{data_dir}: no catalogue here ({CATALOGUE_FILE}); is this the server's data dir? "
                              f"(a server on PostgreSQL: pass --catalogue)")
    owners = live_owners(data_dir)
    if owners:
        pids = ", ".join(sorted({o.split("-")[0] for o in owners}))
        raise RecoveryRefused(f"{data_dir}: a deltaserve server is running on this data dir (pid {pids}); stop it "
                              f"first, or rotate the key through it (deltaserve tenants rotate-key)")
    data_dir.mkdir(parents=True, exist_ok=True)
    cat = Catalogue(target)
    try:
        quotas = store_config(ServerConfig(), pin_host_memory=False)[1].default_quotas
        registry = TenantRegistry(cat, quotas, lambda gone: None)
        try:
            found = registry.get_by_name(tenant)
        except NotFound:
            found = None
        if found is not None and not found.is_admin:
            raise RecoveryRefused(f"tenant {tenant!r} exists and is not an admin; pass --tenant with another name "
                                  f"to create a new admin")
        if found is None:
            _created, key = registry.create(tenant, is_admin=True)
        else:
            key = registry.rotate_key(found.id)
    finally:
        cat.close()
    return write_key(data_dir, key), found is None
