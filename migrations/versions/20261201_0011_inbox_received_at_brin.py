"""A BRIN index on ``webhook_inbox.received_at``, for the console's charts of the last hours.

The inbox is appended in ``received_at`` order, so a BRIN index (a few pages per million rows,
next to nothing to maintain on the webhook path) lets "the messages of the last N hours" read
only the recent end of the table instead of all of it. Built CONCURRENTLY, outside a
transaction, as in 0003: the inbox takes writes on every callback.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 20:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_webhook_inbox_received_at"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.create_index(
            INDEX,
            "webhook_inbox",
            ["received_at"],
            postgresql_using="brin",
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="webhook_inbox", postgresql_concurrently=True)
