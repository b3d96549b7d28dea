"""``deltaserve serve`` against shared storage that is not there or not right: one line naming the component
and why, exit status 1, and nothing loaded first (the model is never read: these configs name none that
exists). Run through ``server.cli.main``, the ``deltaserve`` entry point, in this process."""
from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from delta_store.catalogue import Catalogue
from server.cli import main
from server.config import ServerConfig
from server.storage import open_blobs, open_catalogue, replica_id
from tests.services import free_port


@pytest.fixture(autouse=True)
def _logging_restored():
    """``serve`` points the deltaserve loggers at this test's captured stderr: give them back afterwards."""
    root = logging.getLogger("deltaserve")  # server/logs.py routes every deltaserve.* logger through it
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def serve(tmp_path, capsys, monkeypatch, *args, env=None) -> tuple[int, list[str]]:
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    code = main(["serve", "--data-dir", str(tmp_path / "data"), "--model", str(tmp_path / "no-model"),
                 "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]  # everything it said
    return code, err


def test_unreachable_or_wrong_postgresql_is_one_line_naming_it(tmp_path, capsys, monkeypatch, postgres):
    port = free_port()  # nothing listens there
    code, err = serve(tmp_path, capsys, monkeypatch, "--catalogue", f"postgresql://u:secret@127.0.0.1:{port}/db")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"deltaserve: error: catalogue unavailable (postgresql 127.0.0.1:{port}/db): ")
    assert "secret" not in err[0], "the password is never shown"
    missing_db = postgres.url("no_such_database")
    code, err = serve(tmp_path, capsys, monkeypatch, env={"DELTASERVE_CATALOGUE": missing_db})
    assert code == 1 and len(err) == 1 and 'database "no_such_database" does not exist' in err[0], err
    code, err = serve(tmp_path, capsys, monkeypatch, "--catalogue", "mysql://h/db")
    assert code == 1 and len(err) == 1 and "catalogue must be" in err[0], err


def test_a_catalogue_schema_newer_than_the_server_is_refused_at_start(tmp_path, capsys, monkeypatch, postgres):
    url = postgres.database()
    Catalogue(url).close()
    engine = sa.create_engine(Catalogue(url).url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff0042'"))
    engine.dispose()
    code, err = serve(tmp_path, capsys, monkeypatch, "--catalogue", url)
    assert code == 1 and len(err) == 1 and "schema revision ffff0042, which this server does not know" in err[0]


def test_missing_bucket_unreachable_store_or_no_credentials_is_one_line(tmp_path, capsys, monkeypatch, moto_s3):
    env = dict(moto_s3.env)
    code, err = serve(tmp_path, capsys, monkeypatch, "--blobs", "s3://no-such-bucket/deltas", env=env)
    assert code == 1 and err == ["deltaserve: error: blob store s3://no-such-bucket/deltas/: bucket "
                                 "'no-such-bucket' does not exist"], err
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    code, err = serve(tmp_path, capsys, monkeypatch, "--blobs", "s3://deltas", env=env)
    assert code == 1 and len(err) == 1 and "blob store s3://deltas/ unreachable during HeadBucket" in err[0], err
    code, err = serve(tmp_path, capsys, monkeypatch, "--blobs", "/var/lib/deltas", env=env)
    assert code == 1 and len(err) == 1 and "blobs must be empty" in err[0], err


def test_storage_named_by_the_config(tmp_path, postgres, moto_s3, monkeypatch):
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = moto_s3.bucket()
    config = ServerConfig(data_dir=str(tmp_path), catalogue=postgres.database(), blobs=f"s3://{bucket}/team/a",
                          blob_cache_bytes=1 << 20, replica_id="r-7")
    cat = open_catalogue(config, busy_timeout_s=5.0)
    blobs = open_blobs(config)
    assert cat.dialect == "postgresql" and blobs.where == f"s3://{bucket}/team/a/"
    assert blobs.cache.max_bytes == 1 << 20 and blobs.cache.root == tmp_path / "blob-cache"
    assert replica_id(config) == "r-7" and replica_id(ServerConfig()) != ""
    cat.close()
    local = ServerConfig(data_dir=str(tmp_path / "local"))
    (tmp_path / "local").mkdir()
    assert open_catalogue(local, busy_timeout_s=5.0).where == f"sqlite {tmp_path / 'local' / 'catalogue.sqlite3'}"
    assert open_blobs(local).root == tmp_path / "local" / "blobs"
