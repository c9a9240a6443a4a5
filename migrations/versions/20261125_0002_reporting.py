"""Reporting: the report_* views, the indexes they need, and the pandasync_reporting role.

Hand-written (docs/reporting.md documents every column). The indexes are also declared in
service/ledger/models.py so ``alembic check`` sees no drift. The views read the reporting time
zone from the database setting ``pandasync.reporting_tz`` (set by ``pandasync migrate``)
through report_timezone().

The role is cluster-wide: it is created here only when the migrating user may create roles,
otherwise docs/sql/reporting_role.sql does it. The downgrade revokes what this revision granted
but never drops the role, which other databases of the cluster may still use.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 21:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "pandasync_reporting"

# (name, table, column): plain b-tree indexes, mirrored in the models' __table_args__.
INDEXES = [
    ("ix_orders_upstream_created_at", "orders", "upstream_created_at"),
    ("ix_orders_paid_at", "orders", "paid_at"),
    ("ix_orders_cancelled_at", "orders", "cancelled_at"),
    ("ix_refunds_requested_at", "refunds", "requested_at"),
    ("ix_refunds_resolved_at", "refunds", "resolved_at"),
    ("ix_order_price_changes_observed_at", "order_price_changes", "observed_at"),
]

# The documented tables the role may read whole.
READABLE_TABLES = [
    "orders",
    "order_lines",
    "order_status_history",
    "order_price_changes",
    "shipments",
    "shipment_events",
    "refunds",
    "sync_failures",
    "sweep_cursors",
]
# webhook_inbox minus raw_body and headers: the request as received stays private.
INBOX_COLUMNS = [
    "id",
    "account_id",
    "dedupe_key",
    "received_at",
    "message_type",
    "kind",
    "platform",
    "order_id",
    "refund_id",
    "pushed_at",
    "request_id",
    "state",
    "queued_at",
    "processed_at",
]
VIEWS = [
    "report_daily_sales",
    "report_refunds",
    "report_fulfilment",
    "report_sync_health",
    "report_sales_lines",
    "report_price_changes",
]

REPORT_TIMEZONE = """
CREATE FUNCTION report_timezone() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT coalesce(nullif(current_setting('pandasync.reporting_tz', true), ''),
                      'Asia/Shanghai') $$
"""

# One row per local day from the earliest to the latest sales event. Each day's figures come
# from index range scans on that day's bounds (the LATERAL join), so a filter on day or
# day_start reads only the days asked for instead of aggregating the whole ledger.
REPORT_DAILY_SALES = """
CREATE VIEW report_daily_sales AS
WITH bounds AS (
    SELECT least(
               (SELECT min(upstream_created_at) FROM orders),
               (SELECT min(paid_at) FROM orders),
               (SELECT min(cancelled_at) FROM orders),
               (SELECT min(resolved_at) FROM refunds WHERE status = 'refunded')
           ) AS first_at,
           greatest(
               (SELECT max(upstream_created_at) FROM orders),
               (SELECT max(paid_at) FROM orders),
               (SELECT max(cancelled_at) FROM orders),
               (SELECT max(resolved_at) FROM refunds WHERE status = 'refunded')
           ) AS last_at
),
calendar AS (
    SELECT g.day::date AS day,
           g.day::date::timestamp AT TIME ZONE report_timezone() AS day_start,
           (g.day::date + 1)::timestamp AT TIME ZONE report_timezone() AS day_end
    FROM bounds b,
         generate_series((b.first_at AT TIME ZONE report_timezone())::date::timestamp,
                         (b.last_at AT TIME ZONE report_timezone())::date::timestamp,
                         interval '1 day') AS g(day)
)
SELECT c.day,
       c.day_start,
       c.day_end,
       s.account_id,
       s.platform,
       s.currency,
       s.orders_created,
       s.orders_paid,
       s.orders_cancelled,
       s.gross_amount,
       s.refunds,
       s.refunded_amount,
       s.gross_amount - s.refunded_amount AS net_amount
FROM calendar c
CROSS JOIN LATERAL (
    SELECT e.account_id,
           e.platform,
           e.currency,
           count(*) FILTER (WHERE e.kind = 1) AS orders_created,
           count(*) FILTER (WHERE e.kind = 2) AS orders_paid,
           count(*) FILTER (WHERE e.kind = 3) AS orders_cancelled,
           coalesce(sum(e.amount) FILTER (WHERE e.kind = 2), 0)::numeric(18, 2) AS gross_amount,
           count(*) FILTER (WHERE e.kind = 4) AS refunds,
           coalesce(sum(e.amount) FILTER (WHERE e.kind = 4), 0)::numeric(18, 2)
               AS refunded_amount
    FROM (
        SELECT 1 AS kind, o.account_id, o.platform, o.currency, NULL::numeric AS amount
        FROM orders o
        WHERE o.upstream_created_at >= c.day_start AND o.upstream_created_at < c.day_end
        UNION ALL
        SELECT 2, o.account_id, o.platform, o.currency, o.total_amount
        FROM orders o
        WHERE o.paid_at >= c.day_start AND o.paid_at < c.day_end
        UNION ALL
        SELECT 3, o.account_id, o.platform, o.currency, NULL
        FROM orders o
        WHERE o.cancelled_at >= c.day_start AND o.cancelled_at < c.day_end
        UNION ALL
        SELECT 4, r.account_id, r.platform, r.currency, r.amount
        FROM refunds r
        WHERE r.status = 'refunded' AND r.resolved_at >= c.day_start AND r.resolved_at < c.day_end
    ) e
    GROUP BY e.account_id, e.platform, e.currency
) s
"""

REPORT_REFUNDS = """
CREATE VIEW report_refunds AS
SELECT r.id AS refund_pk,
       r.account_id,
       r.platform,
       r.refund_id,
       r.order_pk,
       o.order_id,
       r.line_id,
       r.status,
       r.raw_status,
       r.currency,
       r.amount,
       r.reason,
       r.requested_at,
       r.resolved_at,
       (r.requested_at AT TIME ZONE report_timezone())::date AS requested_day,
       (r.resolved_at AT TIME ZONE report_timezone())::date AS resolved_day,
       r.resolved_at - r.requested_at AS time_to_resolve,
       o.status AS order_status,
       o.refund_state AS order_refund_state,
       o.total_amount AS order_total_amount,
       o.paid_at AS order_paid_at
FROM refunds r
JOIN orders o ON o.id = r.order_pk
"""

# Per paid order. The order's own shipped/delivered times win; the logistics trace fills in
# when upstream left them empty (delivered only once every parcel is). The parcels are read by
# one index probe per order (plain aggregates: an ordered aggregate would sort per order), and
# a filter on an order column still reaches the orders indexes.
REPORT_FULFILMENT = """
CREATE VIEW report_fulfilment AS
SELECT o.id AS order_pk,
       o.account_id,
       o.platform,
       o.order_id,
       o.status,
       o.refund_state,
       o.currency,
       o.total_amount,
       o.paid_at,
       coalesce(o.shipped_at, s.first_event_at) AS shipped_at,
       coalesce(o.delivered_at, s.delivered_at) AS delivered_at,
       o.completed_at,
       (o.paid_at AT TIME ZONE report_timezone())::date AS paid_day,
       s.shipments,
       s.carrier,
       s.carrier_code,
       s.tracking_number,
       coalesce(o.shipped_at, s.first_event_at) - o.paid_at AS time_to_ship,
       coalesce(o.delivered_at, s.delivered_at) - coalesce(o.shipped_at, s.first_event_at)
           AS time_in_transit,
       coalesce(o.delivered_at, s.delivered_at) - o.paid_at AS time_to_deliver
FROM orders o
CROSS JOIN LATERAL (
    SELECT count(*) AS shipments,
           min(sh.first_event_at) AS first_event_at,
           CASE WHEN count(*) > 0 AND count(sh.delivered_at) = count(*)
                THEN max(sh.delivered_at) END AS delivered_at,
           CASE WHEN min(sh.carrier) = max(sh.carrier) THEN min(sh.carrier)
                WHEN count(sh.carrier) > 0 THEN 'multiple' END AS carrier,
           CASE WHEN min(sh.carrier_code) = max(sh.carrier_code) THEN min(sh.carrier_code)
                WHEN count(sh.carrier_code) > 0 THEN 'multiple' END AS carrier_code,
           CASE WHEN count(*) = 1 THEN min(sh.tracking_number) END AS tracking_number
    FROM shipments sh
    WHERE sh.order_pk = o.id
) s
WHERE o.paid_at IS NOT NULL
"""

# One row per (account, platform) that has a backlog, an open failure or a sweep cursor.
# Inbox messages without a platform (probes of unknown kind) report under platform NULL.
REPORT_SYNC_HEALTH = """
CREATE VIEW report_sync_health AS
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

REPORT_SALES_LINES = """
CREATE VIEW report_sales_lines AS
SELECT l.id AS line_pk,
       l.order_pk,
       o.account_id,
       o.platform,
       o.order_id,
       o.status AS order_status,
       o.refund_state AS order_refund_state,
       o.currency,
       o.paid_at,
       (o.paid_at AT TIME ZONE report_timezone())::date AS paid_day,
       l.line_id,
       l.product_id,
       l.sku_id,
       l.title,
       l.quantity,
       l.unit_price,
       l.amount
FROM orders o
JOIN order_lines l ON l.order_pk = o.id
WHERE o.paid_at IS NOT NULL
"""

REPORT_PRICE_CHANGES = """
CREATE VIEW report_price_changes AS
SELECT c.id AS change_pk,
       c.order_pk,
       o.account_id,
       o.platform,
       o.order_id,
       c.observed_at,
       (c.observed_at AT TIME ZONE report_timezone())::date AS observed_day,
       c.upstream_modified_at,
       c.source,
       c.currency,
       c.old_total_amount,
       c.new_total_amount,
       c.new_total_amount - c.old_total_amount AS total_change,
       c.old_product_amount,
       c.new_product_amount,
       c.old_shipping_fee,
       c.new_shipping_fee
FROM order_price_changes c
JOIN orders o ON o.id = c.order_pk
"""

# Creates the role when it is missing and the migrating user may; a concurrent migration of
# another database may win the race, which is fine.
CREATE_ROLE = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        IF EXISTS (SELECT FROM pg_roles
                   WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
            BEGIN
                CREATE ROLE {ROLE} NOLOGIN;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        ELSE
            RAISE NOTICE 'role {ROLE} not created: % may not create roles; run '
                'docs/sql/reporting_role.sql as a role that may', current_user;
        END IF;
    END IF;
END
$$
"""


def _grants(action: str) -> str:
    """GRANT or REVOKE the role's privileges, only when the role exists."""
    to_from = "TO" if action == "GRANT" else "FROM"
    tables = ", ".join(READABLE_TABLES + VIEWS)
    inbox_columns = ", ".join(INBOX_COLUMNS)
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        EXECUTE '{action} SELECT ON {tables} {to_from} {ROLE}';
        EXECUTE '{action} SELECT ({inbox_columns}) ON webhook_inbox {to_from} {ROLE}';
        EXECUTE '{action} EXECUTE ON FUNCTION report_timezone() {to_from} {ROLE}';
        -- Only the schema's owner may grant on it (PUBLIC has USAGE on public anyway).
        IF pg_has_role(current_user, (SELECT nspowner FROM pg_namespace
                                      WHERE nspname = current_schema()), 'USAGE') THEN
            EXECUTE format('{action} USAGE ON SCHEMA %I {to_from} {ROLE}', current_schema());
        END IF;
    END IF;
END
$$
"""


def upgrade() -> None:
    # Plain builds inside the migration's transaction: writes to these tables wait while they
    # run (about a second per index per million rows). IF NOT EXISTS keeps indexes pre-built
    # CONCURRENTLY with docs/sql/reporting_indexes.sql on a large live ledger.
    for name, table, column in INDEXES:
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column})")
    op.execute(REPORT_TIMEZONE)
    for view in (
        REPORT_DAILY_SALES,
        REPORT_REFUNDS,
        REPORT_FULFILMENT,
        REPORT_SYNC_HEALTH,
        REPORT_SALES_LINES,
        REPORT_PRICE_CHANGES,
    ):
        op.execute(view)
    op.execute(CREATE_ROLE)
    op.execute(_grants("GRANT"))


def downgrade() -> None:
    op.execute(_grants("REVOKE"))
    for view in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.execute("DROP FUNCTION IF EXISTS report_timezone()")
    for name, _table, _column in reversed(INDEXES):
        op.execute(f"DROP INDEX IF EXISTS {name}")
