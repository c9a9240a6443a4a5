-- The indexes of migration 0002 (reporting), built without blocking writes.
--
-- The migration builds them inside its transaction, which holds writes to orders, refunds and
-- order_price_changes for about a second per index per million rows. On a large live ledger,
-- run this first (with psql: CONCURRENTLY cannot run inside a transaction block), then
-- `pandasync migrate`, which keeps existing indexes (CREATE INDEX IF NOT EXISTS).
--   psql "postgresql://owner@host/pandasync" -v ON_ERROR_STOP=1 -f docs/sql/reporting_indexes.sql
-- A build that fails leaves an INVALID index: drop it (DROP INDEX CONCURRENTLY name) and rerun.

CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_upstream_created_at ON orders (upstream_created_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_paid_at ON orders (paid_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_cancelled_at ON orders (cancelled_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_refunds_requested_at ON refunds (requested_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_refunds_resolved_at ON refunds (resolved_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_order_price_changes_observed_at ON order_price_changes (observed_at);
