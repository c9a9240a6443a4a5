"""Mapping fidelity: unmapped values in plain sight, a refund sweep, re-mapping as a source.

- ``unmapped_values``: every upstream value the mapping could not place (order, refund and
  parcel statuses, message types), with when it was first and last seen; written by the
  reconcile in its own transaction. ``report_unmapped_values`` adds how many orders hold each
  one now, and ``report_sync_health`` gains a count of them per account and platform.
- ``refund_sweep_cursors``: the refund sweep's cursor and last counts, as ``sweep_cursors`` is
  the order sweep's; ``report_sync_health`` gains its last run.
- ``sync_source`` admits ``remap`` (history written by ``pandasync remap``). Each CHECK is
  replaced NOT VALID and validated in a second statement, which does not block writes.

report_sync_health keeps its columns in place and adds the new ones at the end (CREATE OR
REPLACE VIEW), so a dashboard reading it by name or by position goes on working.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 12:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "pandasync_reporting"
SOURCE_TABLES = ("order_status_history", "order_price_changes", "sync_failures")
SOURCES_BEFORE = ("webhook", "sweep", "refresh", "backfill", "manual", "replay")
SOURCES_AFTER = (*SOURCES_BEFORE, "remap")
PLATFORMS = ("taobao", "1688")
FIELDS = ("order_status", "refund_status", "parcel_status", "message_type")

REPORT_SYNC_HEALTH_BEFORE = """
CREATE OR REPLACE VIEW report_sync_health AS
WITH inbox AS (
    SELECT account_id,
           platform,
           count(*) FILTER (WHERE state = 'received') AS inbox_unqueued,
           count(*) AS inbox_backlog,
           min(received_at) AS oldest_unprocessed_at
    FROM webhook_inbox
    WHERE state IN ('received', 'queued')
    GROUP BY account_id, platform
),
failures AS (
    SELECT account_id,
           platform,
           count(*) AS open_failures,
           min(first_failed_at) AS oldest_open_failure_at
    FROM sync_failures
    WHERE resolved_at IS NULL
    GROUP BY account_id, platform
),
keys AS (
    SELECT account_id, platform FROM inbox
    UNION
    SELECT account_id, platform FROM failures
    UNION
    SELECT account_id, platform FROM sweep_cursors
)
SELECT k.account_id,
       k.platform,
       coalesce(i.inbox_unqueued, 0) AS inbox_unqueued,
       coalesce(i.inbox_backlog, 0) AS inbox_backlog,
       i.oldest_unprocessed_at,
       now() - i.oldest_unprocessed_at AS oldest_unprocessed_age,
       coalesce(f.open_failures, 0) AS open_failures,
       f.oldest_open_failure_at,
       sc.last_started_at AS last_sweep_started_at,
       sc.last_finished_at AS last_sweep_finished_at,
       now() - sc.last_finished_at AS last_sweep_age,
       sc.last_examined AS last_sweep_examined,
       sc.last_drift AS last_sweep_drift,
       sc.cursor_at AS sweep_cursor_at
FROM keys k
LEFT JOIN inbox i
       ON i.account_id = k.account_id AND i.platform IS NOT DISTINCT FROM k.platform
LEFT JOIN failures f
       ON f.account_id = k.account_id AND f.platform IS NOT DISTINCT FROM k.platform
LEFT JOIN sweep_cursors sc
       ON sc.account_id = k.account_id AND sc.platform IS NOT DISTINCT FROM k.platform
"""

REPORT_SYNC_HEALTH = """
CREATE OR REPLACE VIEW report_sync_health AS
WITH inbox AS (
    SELECT account_id,
           platform,
           count(*) FILTER (WHERE state = 'received') AS inbox_unqueued,
           count(*) AS inbox_backlog,
           min(received_at) AS oldest_unprocessed_at
    FROM webhook_inbox
    WHERE state IN ('received', 'queued')
    GROUP BY account_id, platform
),
failures AS (
    SELECT account_id,
           platform,
           count(*) AS open_failures,
           min(first_failed_at) AS oldest_open_failure_at
    FROM sync_failures
    WHERE resolved_at IS NULL
    GROUP BY account_id, platform
),
unmapped AS (
    SELECT account_id, platform, count(*) AS unmapped_values, max(last_seen_at) AS last_seen_at
    FROM unmapped_values
    GROUP BY account_id, platform
),
keys AS (
    SELECT account_id, platform FROM inbox
    UNION
    SELECT account_id, platform FROM failures
    UNION
    SELECT account_id, platform FROM sweep_cursors
    UNION
    SELECT account_id, platform FROM refund_sweep_cursors
    UNION
    SELECT account_id, platform FROM unmapped
)
SELECT k.account_id,
       k.platform,
       coalesce(i.inbox_unqueued, 0) AS inbox_unqueued,
       coalesce(i.inbox_backlog, 0) AS inbox_backlog,
       i.oldest_unprocessed_at,
       now() - i.oldest_unprocessed_at AS oldest_unprocessed_age,
       coalesce(f.open_failures, 0) AS open_failures,
       f.oldest_open_failure_at,
       sc.last_started_at AS last_sweep_started_at,
       sc.last_finished_at AS last_sweep_finished_at,
       now() - sc.last_finished_at AS last_sweep_age,
       sc.last_examined AS last_sweep_examined,
       sc.last_drift AS last_sweep_drift,
       sc.cursor_at AS sweep_cursor_at,
       coalesce(u.unmapped_values, 0) AS unmapped_values,
       u.last_seen_at AS unmapped_last_seen_at,
       rc.last_started_at AS last_refund_sweep_started_at,
       rc.last_finished_at AS last_refund_sweep_finished_at,
       now() - rc.last_finished_at AS last_refund_sweep_age,
       rc.last_examined AS last_refund_sweep_examined,
       rc.last_drift AS last_refund_sweep_drift,
       rc.cursor_at AS refund_sweep_cursor_at
FROM keys k
LEFT JOIN inbox i
       ON i.account_id = k.account_id AND i.platform IS NOT DISTINCT FROM k.platform
LEFT JOIN failures f
       ON f.account_id = k.account_id AND f.platform IS NOT DISTINCT FROM k.platform
LEFT JOIN sweep_cursors sc
       ON sc.account_id = k.account_id AND sc.platform IS NOT DISTINCT FROM k.platform
LEFT JOIN refund_sweep_cursors rc
       ON rc.account_id = k.account_id AND rc.platform IS NOT DISTINCT FROM k.platform
LEFT JOIN unmapped u
       ON u.account_id = k.account_id AND u.platform IS NOT DISTINCT FROM k.platform
"""

# How many orders hold each unmapped value now: a status still unplaced on the order (or its
# refund or parcel). A value the mapping has since learned counts 0 once `pandasync remap` (or
# the next reconcile) has placed it. Message types are counted in messages (seen_count):
# counting orders would scan the whole inbox.
REPORT_UNMAPPED_VALUES = """
CREATE VIEW report_unmapped_values AS
SELECT u.account_id,
       u.platform,
       u.field,
       u.value,
       u.first_seen_at,
       u.last_seen_at,
       u.seen_count,
       u.last_order_id,
       CASE u.field
           WHEN 'order_status' THEN (
               SELECT count(*) FROM orders o
               WHERE o.account_id = u.account_id AND o.platform = u.platform
                 AND o.status = 'unknown' AND o.raw_status = u.value)
           WHEN 'refund_status' THEN (
               SELECT count(DISTINCT r.order_pk) FROM refunds r
               WHERE r.account_id = u.account_id AND r.platform = u.platform
                 AND r.status = 'unknown' AND r.raw_status = u.value)
           WHEN 'parcel_status' THEN (
               SELECT count(DISTINCT s.order_pk) FROM shipments s
               JOIN orders o ON o.id = s.order_pk
               WHERE s.account_id = u.account_id AND o.platform = u.platform
                 AND s.raw_status = u.value)
       END AS orders
FROM unmapped_values u
"""


def _source_check(values: Sequence[str]) -> None:
    listed = ", ".join(f"'{v}'" for v in values)
    for table in SOURCE_TABLES:
        name = f"ck_{table}_sync_source"
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        op.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK (source IN ({listed})) NOT VALID"
        )
        op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")


def _grants(action: str) -> str:
    to_from = "TO" if action == "GRANT" else "FROM"
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        EXECUTE '{action} SELECT ON unmapped_values, refund_sweep_cursors,
                 report_unmapped_values {to_from} {ROLE}';
    END IF;
END
$$
"""


def _view_grant() -> str:
    """The role's SELECT on report_sync_health, lost when the view is dropped and built again."""
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        EXECUTE 'GRANT SELECT ON report_sync_health TO {ROLE}';
    END IF;
END
$$
"""


def upgrade() -> None:
    platform = sa.Enum(
        *PLATFORMS, name="platform", native_enum=False, create_constraint=True, length=32
    )
    op.create_table(
        "unmapped_values",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("platform", platform, nullable=True),
        sa.Column(
            "field",
            sa.Enum(
                *FIELDS,
                name="unmapped_field",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.Column(
            "first_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "last_seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "seen_count",
            sa.BigInteger(),
            server_default="1",
            nullable=False,
            comment="Snapshots (or messages) that carried it.",
        ),
        sa.Column("last_order_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_unmapped_values"),
        sa.UniqueConstraint(
            "account_id",
            "platform",
            "field",
            "value",
            name="uq_unmapped_values_account_id_platform_field_value",
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.create_table(
        "refund_sweep_cursors",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("platform", platform, nullable=False),
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
            comment="Refunds the last sweep found missing or out of date.",
        ),
        sa.PrimaryKeyConstraint("account_id", "platform", name="pk_refund_sweep_cursors"),
    )
    _source_check(SOURCES_AFTER)
    op.execute(REPORT_SYNC_HEALTH)
    op.execute(REPORT_UNMAPPED_VALUES)
    op.execute(_grants("GRANT"))


def downgrade() -> None:
    op.execute(_grants("REVOKE"))
    op.execute("DROP VIEW report_unmapped_values")
    # CREATE OR REPLACE cannot drop columns: the view is built again as it was.
    op.execute("DROP VIEW report_sync_health")
    op.execute(REPORT_SYNC_HEALTH_BEFORE.replace("CREATE OR REPLACE VIEW", "CREATE VIEW"))
    op.execute(_view_grant())
    # History written by `pandasync remap` was an operator's command: kept, as `manual`.
    for table in SOURCE_TABLES:
        op.execute(f"UPDATE {table} SET source = 'manual' WHERE source = 'remap'")
    _source_check(SOURCES_BEFORE)
    op.drop_table("refund_sweep_cursors")
    op.drop_table("unmapped_values")
