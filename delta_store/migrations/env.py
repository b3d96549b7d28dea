"""Alembic environment: migrations run on the connection ``database.migrate`` passes in, inside its
write transaction (so replicas starting together migrate once). With the ``alembic`` command line
(``alembic -c delta_store/migrations/alembic.ini ...``, for writing a new revision) the URL comes
from ``-x url=...``."""
from __future__ import annotations

from alembic import context

from delta_store.catalogue_schema import metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        url = context.get_x_argument(as_dictionary=True).get("url")
        if not url:
            raise SystemExit("give the catalogue as -x url=sqlite:///path or -x url=postgresql://...")
        from delta_store.database import catalogue_url, create_engine

        engine = create_engine(catalogue_url(url), busy_timeout_s=30.0)
        with engine.connect() as connection, connection.begin():
            _migrate(connection)
        return
    _migrate(connection)


def _migrate(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


run()
