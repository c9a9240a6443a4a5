-- pandasync_reporting: the read-only role of SQL reporting (docs/reporting.md, "Access").
--
-- `pandasync migrate` does all of this itself when the migrating user is a superuser. When it
-- is not, the migration prints a NOTICE (and `migrate` a warning) and this script does the rest:
--   part 1 (once per cluster): run by a superuser or a role with CREATEROLE;
--   part 2 (in each pandasync database, after `pandasync migrate`): run by the owner of the
--          ledger tables (the user that ran the migrations) or a superuser;
--   part 3 (in each pandasync database, after `pandasync migrate`, and again after granting
--          the role to a new login): the limits, run by a superuser.
-- Every part is idempotent. As a superuser, run the whole file at once:
--   psql "postgresql://admin@host/pandasync" -v ON_ERROR_STOP=1 -f docs/sql/reporting_role.sql
-- The role cannot log in: grant it to the login roles of analysts and dashboards, then run
-- part 3 (or `pandasync migrate`) so that the new login gets the role's timeouts:
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
    unmapped_values, payment_attempts, ledger_changes, outbound_deliveries,
    outbound_delivery_attempts,
    report_daily_sales, report_refunds, report_fulfilment, report_sync_health,
    report_sales_lines, report_price_changes, report_unmapped_values, report_awaiting_payment
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

-- Part 3: the limits (docs/reporting.md, "Access").
--
-- Timeouts: the defaults of PANDASYNC_REPORTING_STATEMENT_TIMEOUT_S (60) and
-- PANDASYNC_REPORTING_IDLE_IN_TRANSACTION_TIMEOUT_S (300); `pandasync migrate` sets the
-- configured ones. Postgres applies a role's settings only to a session that logs in as that
-- role, never to its members, so each login that reads through pandasync_reporting gets its
-- own for this database: for the example login, the loop below runs
--   ALTER ROLE metabase IN DATABASE pandasync SET statement_timeout = '60s';
--   ALTER ROLE metabase IN DATABASE pandasync SET idle_in_transaction_session_timeout = '300s';
-- Needs CREATEROLE (or a superuser). Superusers and the service's own roles are left alone.
ALTER ROLE pandasync_reporting SET statement_timeout = '60s';
ALTER ROLE pandasync_reporting SET idle_in_transaction_session_timeout = '300s';
DO $$
DECLARE
    login name;
BEGIN
    FOR login IN
        SELECT r.rolname FROM pg_roles r
        WHERE r.rolcanlogin AND NOT r.rolsuper AND r.rolname <> 'pandasync_reporting'
          AND pg_has_role(r.oid, 'pandasync_reporting', 'MEMBER')
          AND r.oid NOT IN ((SELECT datdba FROM pg_database WHERE datname = current_database()),
                            (SELECT relowner FROM pg_class WHERE oid = to_regclass('orders')))
    LOOP
        EXECUTE format('ALTER ROLE %I IN DATABASE %I SET statement_timeout = %L',
                       login, current_database(), '60s');
        EXECUTE format('ALTER ROLE %I IN DATABASE %I SET idle_in_transaction_session_timeout = %L',
                       login, current_database(), '300s');
    END LOOP;
END
$$;

-- No temporary tables, nor functions in pg_temp (the only schema the role could create in).
-- TEMPORARY comes from PUBLIC, so a REVOKE from pandasync_reporting alone changes nothing:
-- PUBLIC loses it in this database and the service's roles keep it (the owner holds its own).
-- Other roles that need temporary tables here: GRANT TEMPORARY ON DATABASE pandasync TO them.
-- Needs the database's owner (or a superuser).
DO $$
DECLARE
    service_role name;
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    FOR service_role IN
        SELECT r.rolname FROM pg_roles r
        WHERE r.oid = (SELECT relowner FROM pg_class WHERE oid = to_regclass('orders'))
          AND NOT r.rolsuper
          AND r.oid <> (SELECT datdba FROM pg_database WHERE datname = current_database())
    LOOP
        EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), service_role);
    END LOOP;
END
$$;

-- No advisory locks: the reconcile locks an order with pg_try_advisory_lock(class, key), the
-- key computed from columns the role reads; holding it would stall the order's sync. EXECUTE
-- on every function that takes an advisory lock comes from PUBLIC: PUBLIC loses it in this
-- database, the database's owner and the ledger tables' owner (the service) keep it.
-- Other roles that need advisory locks here: GRANT EXECUTE ON FUNCTION … TO them.
-- Needs a superuser.
DO $$
DECLARE
    lock_function regprocedure;
    service_role name;
BEGIN
    FOR lock_function IN
        SELECT oid::regprocedure FROM pg_proc
        WHERE pronamespace = 'pg_catalog'::regnamespace
          AND proname IN ('pg_advisory_lock', 'pg_advisory_lock_shared',
                          'pg_advisory_xact_lock', 'pg_advisory_xact_lock_shared',
                          'pg_try_advisory_lock', 'pg_try_advisory_lock_shared',
                          'pg_try_advisory_xact_lock', 'pg_try_advisory_xact_lock_shared')
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', lock_function);
        FOR service_role IN
            SELECT r.rolname FROM pg_roles r
            WHERE r.oid IN ((SELECT datdba FROM pg_database WHERE datname = current_database()),
                            (SELECT relowner FROM pg_class WHERE oid = to_regclass('orders')))
              AND NOT r.rolsuper
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', lock_function, service_role);
        END LOOP;
    END LOOP;
END
$$;

-- Removing the role (the migrations never drop it: it is shared by every database of the
-- cluster). In each database where it was granted anything:
--   DROP OWNED BY pandasync_reporting;
-- then once:
--   DROP ROLE pandasync_reporting;
