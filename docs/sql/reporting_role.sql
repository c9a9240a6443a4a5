-- pandasync_reporting: the read-only role of SQL reporting (docs/reporting.md, "Access").
--
-- `pandasync migrate` does all of this itself when the migrating user may create roles. When
-- it may not, the migration prints a NOTICE and this script does the rest:
--   part 1 (once per cluster): run by a superuser or a role with CREATEROLE;
--   part 2 (in each pandasync database, after `pandasync migrate`): run by the owner of the
--          ledger tables (the user that ran the migrations) or a superuser.
-- Both parts are idempotent. As a superuser, run the whole file at once:
--   psql "postgresql://admin@host/pandasync" -v ON_ERROR_STOP=1 -f docs/sql/reporting_role.sql
-- The role cannot log in: grant it to the login roles of analysts and dashboards:
--   GRANT pandasync_reporting TO metabase;

-- Part 1: the role.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pandasync_reporting') THEN
        CREATE ROLE pandasync_reporting NOLOGIN;
    END IF;
END
$$;

-- Part 2: SELECT on the documented tables and views, nothing else. webhook_inbox is readable
-- without raw_body and headers (the request as received stays private). report_timezone()
-- is the views' helper; PUBLIC may run it too unless revoked.
GRANT SELECT ON
    orders, order_lines, order_status_history, order_price_changes, shipments,
    shipment_events, refunds, sync_failures, sweep_cursors, refund_sweep_cursors,
    unmapped_values,
    report_daily_sales, report_refunds, report_fulfilment, report_sync_health,
    report_sales_lines, report_price_changes, report_unmapped_values
TO pandasync_reporting;
GRANT SELECT (
    id, account_id, dedupe_key, received_at, message_type, kind, platform, order_id,
    refund_id, pushed_at, request_id, state, queued_at, processed_at, signature_state
) ON webhook_inbox TO pandasync_reporting;
GRANT EXECUTE ON FUNCTION report_timezone() TO pandasync_reporting;
DO $$
BEGIN
    -- Only the schema's owner may grant on it; PUBLIC has USAGE on `public` by default.
    IF pg_has_role(current_user, (SELECT nspowner FROM pg_namespace
                                  WHERE nspname = current_schema()), 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO pandasync_reporting', current_schema());
    END IF;
END
$$;

-- Removing the role (the migrations never drop it: it is shared by every database of the
-- cluster). In each database where it was granted anything:
--   DROP OWNED BY pandasync_reporting;
-- then once:
--   DROP ROLE pandasync_reporting;
