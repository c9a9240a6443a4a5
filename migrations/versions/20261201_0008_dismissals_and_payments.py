"""Failures a person closes (``sync_failures.dismissed_*``) and ``payment_attempts``.

``pandasync dismiss`` closes a failure that can never succeed and records who closed it, when
and why. ``payment_attempts`` is the audit trail of ``pandasync pay``: one row per order per
attempt, written before the upstream call and updated after it; the partial unique index
``uq_payment_attempts_in_flight`` makes two attempts in flight (or one in flight beside one
whose outcome is unknown) for one order impossible.

Two indexes let an order's story (``pandasync order``) be read without scanning whole tables:
``ix_webhook_inbox_order`` (every message of an order, not only the waiting ones, built
CONCURRENTLY because the inbox takes writes on every callback) and ``ix_sync_failures_order``.

Existing rows need nothing: the new columns are NULL for failures closed by a reconcile.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 19:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAYMENT_STATES = ("started", "paid", "pay_by_hand", "held_back", "failed", "unknown")


def _enum(name: str, *values: str) -> sa.Enum:
    # As the models store enumerations: text with a CHECK constraint, not a Postgres ENUM.
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=32)


INBOX_INDEX = "ix_webhook_inbox_order"


def upgrade() -> None:
    op.add_column("sync_failures", sa.Column("dismissed_at", sa.DateTime(timezone=True)))
    op.add_column("sync_failures", sa.Column("dismissed_by", sa.String(128)))
    op.add_column("sync_failures", sa.Column("dismissed_reason", sa.Text()))

    op.create_table(
        "payment_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("platform", _enum("platform", "taobao", "1688"), nullable=False),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column(
            "run_id", sa.String(36), nullable=False, comment="The `pandasync pay` run that made it."
        ),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column(
            "state",
            _enum("payment_state", *PAYMENT_STATES),
            server_default="started",
            nullable=False,
        ),
        sa.Column(
            "amount",
            sa.Numeric(18, 2),
            comment="The order total the upstream re-fetch showed just before the call.",
        ),
        sa.Column("currency", sa.String(3), server_default="CNY", nullable=False),
        sa.Column("pay_url", sa.Text()),
        sa.Column("upstream_code", sa.String(32)),
        sa.Column("upstream_msg", sa.Text()),
        sa.Column("upstream_request_id", sa.String(128)),
        sa.Column("error", sa.Text()),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_attempts")),
    )
    op.create_index(
        "uq_payment_attempts_in_flight",
        "payment_attempts",
        ["account_id", "platform", "order_id"],
        unique=True,
        postgresql_where=sa.text("state IN ('started', 'unknown')"),
    )
    op.create_index(
        "ix_payment_attempts_order",
        "payment_attempts",
        ["account_id", "platform", "order_id", "started_at"],
    )
    op.create_index(
        "ix_sync_failures_order", "sync_failures", ["account_id", "platform", "order_id"]
    )
    with op.get_context().autocommit_block():
        # As in 0003: a build that failed leaves an invalid index; drop it and build it whole.
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INBOX_INDEX}")
        op.create_index(
            INBOX_INDEX,
            "webhook_inbox",
            ["account_id", "platform", "order_id"],
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INBOX_INDEX, table_name="webhook_inbox", postgresql_concurrently=True)
    op.drop_index("ix_sync_failures_order", table_name="sync_failures")
    op.drop_index("ix_payment_attempts_order", table_name="payment_attempts")
    op.drop_index("uq_payment_attempts_in_flight", table_name="payment_attempts")
    op.drop_table("payment_attempts")
    op.drop_column("sync_failures", "dismissed_reason")
    op.drop_column("sync_failures", "dismissed_by")
    op.drop_column("sync_failures", "dismissed_at")
