"""The catalogue's tables as SQLAlchemy Core objects: one schema for SQLite and PostgreSQL.

Revision 0001 has the columns of the first (pre-SQLAlchemy) SQLite catalogue, so a catalogue written
by it opens (``database.migrate`` stamps it as revision 0001, then upgrades it); 0002 added
``versions.num_parameters`` and ``version_marks``. Types are chosen to mean the same
on both: 64-bit integers for sizes, counters and quotas (PostgreSQL's INTEGER is 32-bit; quotas go
to 2^62), double precision for Unix timestamps, text for JSON lists/maps (compared as written).
Changing a table means a new Alembic revision in ``delta_store/migrations/versions/`` too.
"""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# SQLite makes INTEGER PRIMARY KEY the rowid (auto-assigned); PostgreSQL needs a BIGINT identity.
_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

tenants = sa.Table(
    "tenants", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("key_sha256", sa.Text, nullable=False, unique=True),
    sa.Column("is_admin", sa.Integer, nullable=False),  # 0/1: the first schema's type, portable as is
    sa.Column("max_deltas", sa.BigInteger, nullable=False),
    sa.Column("max_bytes", sa.BigInteger, nullable=False),
    sa.Column("requests_per_minute", sa.BigInteger, nullable=False),
    sa.Column("tokens_per_minute", sa.BigInteger, nullable=False),
    sa.Column("max_concurrent", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Double, nullable=False),
)

deltas = sa.Table(
    "deltas", metadata,
    sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("next_version", sa.BigInteger, nullable=False),  # numbers are never reused after a delete
    sa.Column("created", sa.Double, nullable=False),
    sa.UniqueConstraint("tenant_id", "name"),
)

versions = sa.Table(
    "versions", metadata,
    sa.Column("delta_id", _ROW_ID, sa.ForeignKey("deltas.id", ondelete="CASCADE"), primary_key=True,
              autoincrement=False),
    sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("digest", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("kinds", sa.Text, nullable=False),  # JSON list, sorted
    sa.Column("max_rank", sa.BigInteger, nullable=False),
    sa.Column("max_width", sa.BigInteger, nullable=False),
    sa.Column("source_format", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON object, keys sorted
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("last_used", sa.Double),
    sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("num_parameters", sa.BigInteger),  # scalars in the delta's tensors; NULL: written before 0002
    sa.Index("versions_digest", "digest"),
)

# The highest version ever given to a tenant's name: it outlives the ``deltas`` row (gone with the last
# version), so a name deleted and uploaded again continues its numbers and ``name@N`` never changes weights.
version_marks = sa.Table(
    "version_marks", metadata,
    sa.Column("tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("last_version", sa.BigInteger, nullable=False),
)

blob_gc = sa.Table(
    "blob_gc", metadata,
    sa.Column("digest", sa.Text, primary_key=True),  # a blob to delete once no version references it
    sa.Column("since", sa.Double, nullable=False),
)
