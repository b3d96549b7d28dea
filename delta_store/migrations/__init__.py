"""Alembic migrations of the catalogue schema (one history for SQLite and PostgreSQL); run by
``delta_store.database.migrate`` at start-up, never by hand in normal operation."""
