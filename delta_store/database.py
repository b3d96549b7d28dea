"""The catalogue's database: one SQLAlchemy engine per URL, its write/read transactions, its migrations.

Two dialects, one meaning (D7, D12):

- **SQLite** (the embedded default). WAL lets readers run beside one writer, across threads and
  processes on one host; every write transaction is ``BEGIN IMMEDIATE``, which takes the database's
  write lock at once, so the checks inside it (quotas, "is this blob still referenced") cannot race
  with another writer; ``busy_timeout`` makes writers queue instead of failing. ``synchronous=FULL``:
  an upload that returned survives a power cut (uploads are rare; the fsync costs ~ms).
- **PostgreSQL** (several replicas). Every write transaction first takes one transaction-scoped
  advisory lock (:data:`WRITE_LOCK`), the same one-writer-at-a-time rule as SQLite's, so quota checks
  hold across replicas without per-process counters. Writes are uploads, deletes, tenant changes and
  the usage flush (once a second per replica), each a few ms under the lock: at 10 replicas that is
  ~1-5 % of the lock's time. ``lock_timeout`` plays ``busy_timeout``. Reads take no lock (READ
  COMMITTED, one statement each, or REPEATABLE READ for :func:`read` snapshots).

A database that cannot be reached (refused, down, restarting, locked past the timeout) raises
:class:`Unavailable` naming it, so a request fails fast with UNAVAILABLE and the next one retries:
pooled connections are pinged on checkout, so a restarted PostgreSQL is picked up by itself.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from .errors import FailedPrecondition, InvalidArgument, Unavailable

# pg_advisory_xact_lock key of catalogue writes: any constant that other software on the same
# database does not use; this one is the first 8 bytes of sha256("deltaserve.catalogue.write").
WRITE_LOCK = 0x2F1B_5C03_9A6E_4D17
CONNECT_TIMEOUT_S = 5  # PostgreSQL: a host that does not answer fails the connection after this long
MIGRATIONS = Path(__file__).with_name("migrations")


def catalogue_url(target: str | os.PathLike | sa.URL) -> sa.URL:
    """A file path -> a SQLite URL; ``postgresql://`` (any spelling) -> the psycopg 3 driver."""
    if isinstance(target, sa.URL):
        return target
    text = os.fspath(target)
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text)))
    try:
        url = sa.make_url(text)
    except sa_exc.ArgumentError:
        raise InvalidArgument(f"catalogue URL {_safe(text)!r} is not a database URL") from None
    backend = url.get_backend_name()
    if backend in ("postgres", "postgresql"):
        driver = url.get_driver_name()
        if url.drivername in ("postgres", "postgresql") or driver == "psycopg2":
            url = url.set(drivername="postgresql+psycopg")
    elif backend != "sqlite":
        raise InvalidArgument(f"catalogue URL {_safe(text)!r}: only sqlite and postgresql are supported")
    return url


def describe(url: sa.URL) -> str:
    """The database in one phrase, password hidden (for logs and error messages)."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite {url.database}"
    return f"postgresql {url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def _safe(text: str) -> str:
    try:
        return sa.make_url(text).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return text.split("@")[-1]


def create_engine(url: sa.URL, *, busy_timeout_s: float) -> sa.Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_s)
    return _postgres_engine(url, busy_timeout_s)


def _sqlite_engine(url: sa.URL, busy_timeout_s: float) -> sa.Engine:
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
                              pool_size=8, max_overflow=24, pool_timeout=busy_timeout_s)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # pysqlite's own BEGINs off: we issue them (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        mode = conn.get_execution_options().get("deltaserve_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode else "BEGIN")

    return engine


def _postgres_engine(url: sa.URL, busy_timeout_s: float) -> sa.Engine:
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": CONNECT_TIMEOUT_S}
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True, pool_size=8, max_overflow=24,
                              pool_timeout=busy_timeout_s)
    lock_ms = max(1, int(busy_timeout_s * 1000))

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        if conn.get_execution_options().get("deltaserve_write"):
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {lock_ms}")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    return engine


@contextmanager
def unavailable_as_typed(what: str) -> Iterator[None]:
    """Database errors that mean "cannot reach / cannot lock now" -> :class:`Unavailable` naming ``what``."""
    try:
        yield
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise Unavailable(f"catalogue unavailable ({what}): {detail[0] if detail else type(exc).__name__}") from exc


@contextmanager
def write(engine: sa.Engine, what: str) -> Iterator[sa.Connection]:
    """One write transaction holding the catalogue's write lock from its first statement."""
    with unavailable_as_typed(what), engine.connect() as conn:
        conn = conn.execution_options(deltaserve_write=True)
        with conn.begin():
            yield conn


@contextmanager
def read(engine: sa.Engine, what: str) -> Iterator[sa.Connection]:
    """A read snapshot spanning the statements inside (WAL readers / MVCC never block the writer)."""
    options = {} if engine.dialect.name == "sqlite" else {"isolation_level": "REPEATABLE READ"}
    with unavailable_as_typed(what), engine.connect() as conn:
        conn = conn.execution_options(**options)
        with conn.begin():
            yield conn


# -- migrations ---------------------------------------------------------------------------------------
def _alembic_config(conn: sa.Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(None)
    return ScriptDirectory.from_config(cfg).get_current_head()


def migrate(engine: sa.Engine, what: str) -> str:
    """Bring the schema to this server's head revision (under the write lock, so replicas starting
    together migrate once); refuse a schema newer than this server. Returns the revision in effect."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    with write(engine, what) as conn:
        cfg = _alembic_config(conn)
        script = ScriptDirectory.from_config(cfg)
        head = script.get_current_head()
        current = MigrationContext.configure(conn).get_current_heads()
        for rev in current:
            try:
                known = script.get_revision(rev)
            except CommandError:
                known = None
            if known is None:
                raise FailedPrecondition(f"catalogue {what} has schema revision {rev}, which this server does not "
                                         f"know (written by a newer deltaserve?); this server knows up to {head}")
        if not current:
            legacy = _legacy_schema_version(conn)
            if legacy is not None:
                if legacy > 1:
                    raise FailedPrecondition(f"catalogue {what} has schema version {legacy}; this server knows "
                                             f"up to 1 (then revision {head})")
                command.stamp(cfg, "0001")  # the first SQLite schema is revision 0001, table for table
        command.upgrade(cfg, "head")
        return head


def _legacy_schema_version(conn: sa.Connection) -> int | None:
    """The version in the pre-Alembic ``schema_version`` table, or None where there is no such table."""
    if not sa.inspect(conn).has_table("schema_version"):
        return None
    row = conn.execute(sa.text("SELECT version FROM schema_version")).first()
    return None if row is None else int(row[0])
