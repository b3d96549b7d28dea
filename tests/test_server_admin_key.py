"""Admin keys that cannot lock their owner out (issue 15): rotating the admin key through the CLI updates the
local key file, and ``deltaserve recover-admin-key`` issues a new one offline, on the data dir of a stopped
server (refused while a server holds that data dir). A real server process, the real CLI; the recovered
key is checked in the catalogue the next start reads (a second server start would add ~15 s)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from load.server_proc import ServerProcess  # noqa: E402


def cli(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from server.demo import build_demo_model

    return str(build_demo_model(tmp_path_factory.mktemp("m") / "model", hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2))


def test_admin_key_rotation_updates_the_key_file_and_offline_recovery(tmp_path, model):
    data = tmp_path / "data"
    server = ServerProcess(data, {"grace_seconds": 1.0, "health_grace_seconds": 0.0}, model=model).start()
    key_file = data / "admin.key"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DELTASERVE_DATA_DIR=str(data), DELTASERVE_SERVER=server.address)
    env.pop("DELTASERVE_API_KEY", None)
    try:
        old = key_file.read_text().strip()
        r = cli(env, "tenants", "create", "bob")
        assert r.returncode == 0, r.stderr
        bob_key = r.stdout.split("api_key=")[1].strip()
        r = cli(env, "tenants", "rotate-key", "admin")
        assert r.returncode == 0, r.stderr
        new = key_file.read_text().strip()
        assert new != old, "rotating the admin key left the old (now revoked) key in the key file"
        assert f"api_key={new}" in r.stdout and str(key_file) in r.stdout
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        r = cli(env, "tenants", "list")
        assert r.returncode == 0 and "bob" in r.stdout, r.stderr
        r = cli(env, "tenants", "rotate-key", "bob")  # another tenant's key: the file stays as it is
        assert r.returncode == 0 and key_file.read_text().strip() == new
        bob_key = r.stdout.split("api_key=")[1].strip()
        r = cli(env, "recover-admin-key", "--data-dir", str(data))
        assert r.returncode == 1 and "running" in r.stderr, (r.returncode, r.stderr)
        assert key_file.read_text().strip() == new
    finally:
        assert server.stop() == 0
    key_file.unlink()  # the admin lost it
    r = cli(env, "recover-admin-key", "--data-dir", str(data), "--tenant", "bob")
    assert r.returncode == 1 and "not an admin" in r.stderr, r.stderr
    r = cli(env, "recover-admin-key", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    recovered = key_file.read_text().strip()
    assert recovered.startswith("ds_") and recovered != new and str(key_file) in r.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert list((data / "tmp").iterdir()) == []
    # what the next server start will read: the recovered key is the admin's, the lost one and nothing else changed
    from delta_store.catalogue import Catalogue
    from delta_store.tenants import hash_key

    catalogue = Catalogue(data / "catalogue.sqlite3")
    try:
        admin = catalogue.tenant(key_sha256=hash_key(recovered))
        assert admin is not None and admin.name == "admin" and admin.is_admin
        assert catalogue.tenant(key_sha256=hash_key(new)) is None
        assert catalogue.tenant(key_sha256=hash_key(bob_key)).name == "bob"
    finally:
        catalogue.close()


def test_recovery_on_a_postgresql_catalogue(tmp_path, postgres):
    """Replicas keep the catalogue in PostgreSQL: ``recover-admin-key --catalogue URL`` rotates the admin key
    there (every replica sees it at once) and writes it to this replica's key file; a non-admin tenant of that
    name is refused, and a missing catalogue URL names the option."""
    from delta_store.catalogue import Catalogue
    from delta_store.tenants import TenantRegistry
    from tests.helpers import tenant_quotas

    url = postgres.database()
    catalogue = Catalogue(url)
    registry = TenantRegistry(catalogue, tenant_quotas(), lambda gone: None)
    _admin, old = registry.create("admin", is_admin=True)
    registry.create("alice")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DELTASERVE_CATALOGUE", None)
    data = tmp_path / "replica-data"
    missing = cli(env, "recover-admin-key", "--data-dir", str(data))
    assert missing.returncode == 1 and "--catalogue" in missing.stderr, missing.stderr
    done = cli(env, "recover-admin-key", "--data-dir", str(data), "--catalogue", url)
    assert done.returncode == 0, done.stderr
    new = (data / "admin.key").read_text().strip()
    assert stat.S_IMODE((data / "admin.key").stat().st_mode) == 0o600
    assert registry.get_by_key(old) is None and registry.get_by_key(new).name == "admin"
    refused = cli(dict(env, DELTASERVE_CATALOGUE=url), "recover-admin-key", "--data-dir", str(data), "--tenant", "alice")
    assert refused.returncode == 1 and "is not an admin" in refused.stderr, refused.stderr
    catalogue.close()
