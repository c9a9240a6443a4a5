"""The ledger schema: orders and their history, shipments, refunds, the inbox, sync bookkeeping.

Reviewed by hand: every ledger table carries account_id; unique keys back the idempotent
upserts; enumerated columns are text with CHECK constraints; money numeric(18,2); timestamptz.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 18:01:46.931143
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "backfill_runs",
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
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_page", sa.Integer(), server_default="1", nullable=False),
        sa.Column("orders_seen", sa.Integer(), server_default="0", nullable=False),
        sa.Column("orders_queued", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backfill_runs")),
    )
    op.create_table(
        "job_runs",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("job", name=op.f("pk_job_runs")),
    )
    op.create_table(
        "orders",
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
        sa.Column(
            "status",
            sa.Enum(
                "pending_payment",
                "paid",
                "shipped",
                "completed",
                "cancelled",
                "unknown",
                name="order_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("raw_status", sa.String(length=64), nullable=False),
        sa.Column(
            "refund_state",
            sa.Enum(
                "none",
                "requested",
                "refunded",
                "rejected",
                name="refund_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            server_default="none",
            nullable=False,
        ),
        sa.Column("currency", sa.String(length=3), server_default="CNY", nullable=False),
        sa.Column("total_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("product_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("shipping_fee", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("discount_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column(
            "refunded_amount", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False
        ),
        sa.Column("close_reason", sa.Text(), nullable=True),
        sa.Column("upstream_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("upstream_modified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("shipped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "raw",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "snapshot_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the snapshot now stored was fetched; older snapshots never overwrite it.",
        ),
        sa.Column(
            "first_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_synced_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
        sa.UniqueConstraint(
            "account_id",
            "platform",
            "order_id",
            name=op.f("uq_orders_account_id_platform_order_id"),
        ),
    )
    op.create_index(
        "ix_orders_not_final_synced",
        "orders",
        ["last_synced_at"],
        unique=False,
        postgresql_where=sa.text(
            "status IN ('pending_payment', 'paid', 'shipped') OR refund_state = 'requested'"
        ),
    )
    op.create_table(
        "sweep_cursors",
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
        sa.Column(
            "cursor_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Upstream modification time up to which every page has been processed.",
        ),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_examined", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "last_drift",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Orders the last sweep found out of date.",
        ),
        sa.PrimaryKeyConstraint("account_id", "platform", name=op.f("pk_sweep_cursors")),
    )
    op.create_table(
        "sync_failures",
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
        sa.Column(
            "kind",
            sa.Enum(
                "permanent",
                "exhausted",
                name="failure_kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "source",
            sa.Enum(
                "webhook",
                "sweep",
                "refresh",
                "backfill",
                "manual",
                "replay",
                name="sync_source",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("upstream_code", sa.String(length=32), nullable=True),
        sa.Column("upstream_msg", sa.Text(), nullable=True),
        sa.Column("upstream_request_id", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column(
            "first_failed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_failed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replay_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_failures")),
    )
    op.create_index(
        "uq_sync_failures_open_order",
        "sync_failures",
        ["account_id", "platform", "order_id"],
        unique=True,
        postgresql_where=sa.text("resolved_at IS NULL"),
    )
    op.create_table(
        "webhook_inbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("dedupe_key", sa.String(length=64), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("message_type", sa.String(length=128), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "price",
                "status",
                "refund",
                "other",
                name="message_kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
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
            nullable=True,
        ),
        sa.Column("order_id", sa.String(length=64), nullable=True),
        sa.Column("refund_id", sa.String(length=64), nullable=True),
        sa.Column(
            "pushed_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="The envelope's push timestamp.",
        ),
        sa.Column("raw_body", sa.LargeBinary(), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="Request headers minus the signature.",
        ),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "received",
                "queued",
                "processed",
                "ignored",
                name="inbox_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            server_default="received",
            nullable=False,
        ),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_inbox")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_webhook_inbox_dedupe_key")),
    )
    op.create_index(
        "ix_webhook_inbox_open_by_order",
        "webhook_inbox",
        ["account_id", "platform", "order_id"],
        unique=False,
        postgresql_where=sa.text("state IN ('received', 'queued')"),
    )
    op.create_index(
        "ix_webhook_inbox_unqueued",
        "webhook_inbox",
        ["received_at"],
        unique=False,
        postgresql_where=sa.text("state = 'received'"),
    )
    op.create_table(
        "webhook_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column(
            "seen_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_webhook_nonces")),
    )
    op.create_index(op.f("ix_webhook_nonces_seen_at"), "webhook_nonces", ["seen_at"], unique=False)
    op.create_table(
        "order_lines",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.BigInteger(), nullable=False),
        sa.Column("line_id", sa.String(length=64), nullable=False),
        sa.Column("product_id", sa.String(length=64), nullable=True),
        sa.Column("sku_id", sa.String(length=64), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=True),
        sa.Column("unit_price", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("raw_status", sa.String(length=64), nullable=True),
        sa.Column(
            "raw",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["order_pk"],
            ["orders.id"],
            name=op.f("fk_order_lines_order_pk_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_lines")),
        sa.UniqueConstraint("order_pk", "line_id", name=op.f("uq_order_lines_order_pk_line_id")),
    )
    op.create_table(
        "order_price_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("old_total_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("new_total_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("old_product_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("new_product_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("old_shipping_fee", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("new_shipping_fee", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("upstream_modified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "observed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "source",
            sa.Enum(
                "webhook",
                "sweep",
                "refresh",
                "backfill",
                "manual",
                "replay",
                name="sync_source",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("inbox_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["inbox_id"],
            ["webhook_inbox.id"],
            name=op.f("fk_order_price_changes_inbox_id_webhook_inbox"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["order_pk"],
            ["orders.id"],
            name=op.f("fk_order_price_changes_order_pk_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_price_changes")),
    )
    op.create_index(
        op.f("ix_order_price_changes_inbox_id"), "order_price_changes", ["inbox_id"], unique=False
    )
    op.create_index(
        op.f("ix_order_price_changes_order_pk"),
        "order_price_changes",
        ["order_pk", "observed_at"],
        unique=False,
    )
    op.create_table(
        "order_status_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.BigInteger(), nullable=False),
        sa.Column(
            "from_status",
            sa.Enum(
                "pending_payment",
                "paid",
                "shipped",
                "completed",
                "cancelled",
                "unknown",
                name="from_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=True,
        ),
        sa.Column(
            "to_status",
            sa.Enum(
                "pending_payment",
                "paid",
                "shipped",
                "completed",
                "cancelled",
                "unknown",
                name="to_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("from_raw_status", sa.String(length=64), nullable=True),
        sa.Column("to_raw_status", sa.String(length=64), nullable=False),
        sa.Column("upstream_modified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "observed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "source",
            sa.Enum(
                "webhook",
                "sweep",
                "refresh",
                "backfill",
                "manual",
                "replay",
                name="sync_source",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("inbox_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["inbox_id"],
            ["webhook_inbox.id"],
            name=op.f("fk_order_status_history_inbox_id_webhook_inbox"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["order_pk"],
            ["orders.id"],
            name=op.f("fk_order_status_history_order_pk_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_status_history")),
    )
    op.create_index(
        op.f("ix_order_status_history_inbox_id"), "order_status_history", ["inbox_id"], unique=False
    )
    op.create_index(
        op.f("ix_order_status_history_order_pk"),
        "order_status_history",
        ["order_pk", "observed_at"],
        unique=False,
    )
    op.create_table(
        "refunds",
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
        sa.Column("refund_id", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.BigInteger(), nullable=False),
        sa.Column("line_id", sa.String(length=64), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "requested",
                "refunded",
                "rejected",
                "cancelled",
                "unknown",
                name="refund_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("raw_status", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), server_default="CNY", nullable=False),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("upstream_modified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "raw",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "last_synced_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["order_pk"], ["orders.id"], name=op.f("fk_refunds_order_pk_orders"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        sa.UniqueConstraint(
            "account_id",
            "platform",
            "refund_id",
            name=op.f("uq_refunds_account_id_platform_refund_id"),
        ),
    )
    op.create_index(op.f("ix_refunds_order_pk"), "refunds", ["order_pk"], unique=False)
    op.create_table(
        "shipments",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.BigInteger(), nullable=False),
        sa.Column("tracking_number", sa.String(length=64), nullable=False),
        sa.Column("line_id", sa.String(length=64), nullable=True),
        sa.Column("carrier", sa.Text(), nullable=True),
        sa.Column("carrier_code", sa.String(length=64), nullable=True),
        sa.Column("raw_status", sa.String(length=64), nullable=True),
        sa.Column("first_event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "raw",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "last_synced_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["order_pk"],
            ["orders.id"],
            name=op.f("fk_shipments_order_pk_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shipments")),
        sa.UniqueConstraint(
            "order_pk", "tracking_number", name=op.f("uq_shipments_order_pk_tracking_number")
        ),
    )
    op.create_table(
        "shipment_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("shipment_id", sa.BigInteger(), nullable=False),
        sa.Column("event_key", sa.String(length=64), nullable=False),
        sa.Column("event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=64), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("location", sa.Text(), nullable=True),
        sa.Column(
            "raw",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "observed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["shipment_id"],
            ["shipments.id"],
            name=op.f("fk_shipment_events_shipment_id_shipments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shipment_events")),
        sa.UniqueConstraint(
            "shipment_id", "event_key", name=op.f("uq_shipment_events_shipment_id_event_key")
        ),
    )


def downgrade() -> None:
    op.drop_table("shipment_events")
    op.drop_table("shipments")
    op.drop_index(op.f("ix_refunds_order_pk"), table_name="refunds")
    op.drop_table("refunds")
    op.drop_index(op.f("ix_order_status_history_order_pk"), table_name="order_status_history")
    op.drop_index(op.f("ix_order_status_history_inbox_id"), table_name="order_status_history")
    op.drop_table("order_status_history")
    op.drop_index(op.f("ix_order_price_changes_order_pk"), table_name="order_price_changes")
    op.drop_index(op.f("ix_order_price_changes_inbox_id"), table_name="order_price_changes")
    op.drop_table("order_price_changes")
    op.drop_table("order_lines")
    op.drop_index(op.f("ix_webhook_nonces_seen_at"), table_name="webhook_nonces")
    op.drop_table("webhook_nonces")
    op.drop_index(
        "ix_webhook_inbox_unqueued",
        table_name="webhook_inbox",
        postgresql_where=sa.text("state = 'received'"),
    )
    op.drop_index(
        "ix_webhook_inbox_open_by_order",
        table_name="webhook_inbox",
        postgresql_where=sa.text("state IN ('received', 'queued')"),
    )
    op.drop_table("webhook_inbox")
    op.drop_index(
        "uq_sync_failures_open_order",
        table_name="sync_failures",
        postgresql_where=sa.text("resolved_at IS NULL"),
    )
    op.drop_table("sync_failures")
    op.drop_table("sweep_cursors")
    op.drop_index(
        "ix_orders_not_final_synced",
        table_name="orders",
        postgresql_where=sa.text(
            "status IN ('pending_payment', 'paid', 'shipped') OR refund_state = 'requested'"
        ),
    )
    op.drop_table("orders")
    op.drop_table("job_runs")
    op.drop_table("backfill_runs")
