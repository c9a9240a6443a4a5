"""The change feed (``ledger_changes``, a NOTIFY per row) and outbound webhooks.

``ledger_changes``: one row per real change of an order, written by the ledger write in its own
transaction; an AFTER INSERT trigger sends ``NOTIFY pandasync_ledger_changes, '<id>'``, which
Postgres delivers on commit (and never for a rolled-back row). ``outbound_endpoints``,
``outbound_deliveries`` and ``outbound_delivery_attempts`` hold the operator's receivers and
every delivery made to them (docs/operations.md). ``pandasync_reporting`` gets SELECT on
``ledger_changes`` and on the delivery tables, never on ``outbound_endpoints`` (it holds the
signing secrets).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "pandasync_reporting"
CHANNEL = "pandasync_ledger_changes"
GRANTED = "ledger_changes, outbound_deliveries, outbound_delivery_attempts"

NOTIFY_FUNCTION = f"""
CREATE FUNCTION ledger_changes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.id::text);
    RETURN NULL;
END
$$
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER ledger_changes_notify AFTER INSERT ON ledger_changes
FOR EACH ROW EXECUTE FUNCTION ledger_changes_notify()
"""


def _grants(action: str) -> str:
    """GRANT or REVOKE the role's SELECT, only when the role exists."""
    to_from = "TO" if action == "GRANT" else "FROM"
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        EXECUTE '{action} SELECT ON {GRANTED} {to_from} {ROLE}';
    END IF;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "outbound_endpoints",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "event_types",
            postgresql.ARRAY(sa.Text()),
            nullable=True,
            comment="Change kinds sent; NULL: all.",
        ),
        sa.Column(
            "account_ids",
            postgresql.ARRAY(sa.Text()),
            nullable=True,
            comment="Accounts whose changes are sent; NULL: all.",
        ),
        sa.Column("secret", sa.Text(), nullable=False, comment="whsec_… signing secret."),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column(
            "feed_horizon",
            sa.BigInteger(),
            server_default=sa.text("(pg_snapshot_xmin(pg_current_snapshot()))::text::bigint"),
            nullable=False,
            comment="Changes with a smaller tx_id have been fanned out to this endpoint.",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_endpoints")),
    )
    op.create_table(
        "ledger_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column(
            "platform",
            sa.Enum(
                "taobao",
                "1688",
                name="platform",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.BigInteger(), nullable=True),
        sa.Column(
            "kind",
            sa.Enum(
                "order.status_changed",
                "order.price_changed",
                "order.shipped",
                "order.delivered",
                "order.refund_changed",
                "payment.outcome",
                name="change_kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When upstream says it happened (its modification time), if it says.",
        ),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "tx_id",
            sa.BigInteger(),
            server_default=sa.text("(pg_current_xact_id())::text::bigint"),
            nullable=False,
            comment="The writing transaction's id (xid8 as bigint).",
        ),
        sa.ForeignKeyConstraint(
            ["order_pk"],
            ["orders.id"],
            name=op.f("fk_ledger_changes_order_pk_orders"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_changes")),
    )
    op.create_index(
        op.f("ix_ledger_changes_account_id"),
        "ledger_changes",
        ["account_id", "platform", "order_id", "id"],
        unique=False,
    )
    op.create_index(
        "ix_ledger_changes_recorded_at", "ledger_changes", ["recorded_at"], unique=False
    )
    op.create_index(op.f("ix_ledger_changes_tx_id"), "ledger_changes", ["tx_id"], unique=False)
    op.create_table(
        "outbound_deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("endpoint_id", sa.BigInteger(), nullable=False),
        sa.Column("change_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column(
            "platform",
            sa.Enum(
                "taobao",
                "1688",
                name="platform",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "delivered",
                "failed",
                name="delivery_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            server_default="pending",
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_latency_ms", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["change_id"],
            ["ledger_changes.id"],
            name=op.f("fk_outbound_deliveries_change_id_ledger_changes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["outbound_endpoints.id"],
            name=op.f("fk_outbound_deliveries_endpoint_id_outbound_endpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_deliveries")),
        sa.UniqueConstraint(
            "endpoint_id", "change_id", name=op.f("uq_outbound_deliveries_endpoint_id_change_id")
        ),
    )
    op.create_index(
        "ix_outbound_deliveries_due",
        "outbound_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        op.f("ix_outbound_deliveries_endpoint_id"),
        "outbound_deliveries",
        ["endpoint_id", "account_id", "platform", "order_id", "change_id"],
        unique=False,
    )
    op.create_table(
        "outbound_delivery_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "attempted_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["outbound_deliveries.id"],
            name=op.f("fk_outbound_delivery_attempts_delivery_id_outbound_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_delivery_attempts")),
    )
    op.create_index(
        op.f("ix_outbound_delivery_attempts_delivery_id"),
        "outbound_delivery_attempts",
        ["delivery_id"],
        unique=False,
    )
    op.execute(NOTIFY_FUNCTION)
    op.execute(NOTIFY_TRIGGER)
    op.execute(_grants("GRANT"))


def downgrade() -> None:
    op.execute(_grants("REVOKE"))
    op.execute("DROP TRIGGER IF EXISTS ledger_changes_notify ON ledger_changes")
    op.execute("DROP FUNCTION IF EXISTS ledger_changes_notify()")
    op.drop_index(
        op.f("ix_outbound_delivery_attempts_delivery_id"), table_name="outbound_delivery_attempts"
    )
    op.drop_table("outbound_delivery_attempts")
    op.drop_index(op.f("ix_outbound_deliveries_endpoint_id"), table_name="outbound_deliveries")
    op.drop_index(
        "ix_outbound_deliveries_due",
        table_name="outbound_deliveries",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.drop_table("outbound_deliveries")
    op.drop_index(op.f("ix_ledger_changes_tx_id"), table_name="ledger_changes")
    op.drop_index("ix_ledger_changes_recorded_at", table_name="ledger_changes")
    op.drop_index(op.f("ix_ledger_changes_account_id"), table_name="ledger_changes")
    op.drop_table("ledger_changes")
    op.drop_table("outbound_endpoints")
