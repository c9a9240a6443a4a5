"""The relay's scan of handed-off rows: a partial index on ``queued_at`` of ``queued`` rows.

Built CONCURRENTLY, outside a transaction: webhook_inbox takes writes on every callback, and
PandaPon waits 1 s for an answer. A build that failed leaves an invalid index behind; it is
dropped first, so running the migration again builds it whole.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 00:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_webhook_inbox_handed_off"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.create_index(
            INDEX,
            "webhook_inbox",
            ["queued_at"],
            unique=False,
            postgresql_where="state = 'queued'",
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="webhook_inbox", postgresql_concurrently=True)
