"""Version numbers never reused; parameter counts stored.

``version_marks``: per tenant and name, the highest version ever given. Until now the only record was
``deltas.next_version``, deleted with the name's last version, so an upload after deleting every version
was ``@1`` again with other weights. The marks of live names are taken from ``next_version``; names whose
every version was deleted before this revision left no trace to take a mark from (their next upload
continues from 1, as it would have before).

``versions.num_parameters``: NULL in the rows written before this revision; the store fills them from
the blobs at start-up (``DeltaStore.recover``).

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("num_parameters", sa.BigInteger))
    op.create_table(
        "version_marks",
        sa.Column("tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("last_version", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO version_marks (tenant_id, name, last_version) "
               "SELECT tenant_id, name, next_version - 1 FROM deltas")


def downgrade() -> None:
    op.drop_table("version_marks")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("num_parameters")
