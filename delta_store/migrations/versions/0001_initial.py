"""The first catalogue schema: tenants, deltas, immutable versions, the blob collection queue.

Table for table what the pre-Alembic SQLite catalogue created, so such a catalogue is stamped as
this revision and opens unchanged. Written out here, not imported from ``catalogue_schema``, because
a revision must keep creating what it created when it was written.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("key_sha256", sa.Text, nullable=False, unique=True),
        sa.Column("is_admin", sa.Integer, nullable=False),
        sa.Column("max_deltas", sa.BigInteger, nullable=False),
        sa.Column("max_bytes", sa.BigInteger, nullable=False),
        sa.Column("requests_per_minute", sa.BigInteger, nullable=False),
        sa.Column("tokens_per_minute", sa.BigInteger, nullable=False),
        sa.Column("max_concurrent", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
    )
    op.create_table(
        "deltas",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("next_version", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    op.create_table(
        "versions",
        sa.Column("delta_id", _ROW_ID, sa.ForeignKey("deltas.id", ondelete="CASCADE"), primary_key=True,
                  autoincrement=False),
        sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("kinds", sa.Text, nullable=False),
        sa.Column("max_rank", sa.BigInteger, nullable=False),
        sa.Column("max_width", sa.BigInteger, nullable=False),
        sa.Column("source_format", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("last_used", sa.Double),
        sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("tokens", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_index("versions_digest", "versions", ["digest"])
    op.create_table(
        "blob_gc",
        sa.Column("digest", sa.Text, primary_key=True),
        sa.Column("since", sa.Double, nullable=False),
    )


def downgrade() -> None:
    for table in ("blob_gc", "versions", "deltas", "tenants"):
        op.drop_table(table)
