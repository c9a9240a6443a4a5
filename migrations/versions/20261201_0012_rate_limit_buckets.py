"""``rate_limit_buckets``: the shared upstream rate limit when no Redis holds it.

With a RabbitMQ broker (and no PANDASYNC_RATE_LIMIT_REDIS_URL) every worker process takes its
tokens from one row per account here (``service.pandapon.ratelimit.PostgresTokenBucket``), so N
processes on any number of hosts send one account's limit, not N times it. A few rows, updated
in place: nothing to index beyond the key.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 21:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_limit_buckets",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Double(), nullable=False),
        sa.Column("stamp", sa.Double(), nullable=False),
        sa.Column("blocked_until", sa.Double(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_limit_buckets")),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_buckets")
