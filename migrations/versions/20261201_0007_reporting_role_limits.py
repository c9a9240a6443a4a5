"""Reporting role limits: no temporary objects, no advisory locks, for PUBLIC.

The reconcile serialises the work on an order with ``pg_try_advisory_lock(class, key)``, the key
a CRC of columns pandasync_reporting reads (workers/reconcile.py ``order_lock_key``); the
scheduler does the same for its jobs. Any role may call those functions, so an analyst could
hold an order's lock and stall its sync. Postgres has no per-role deny, and the functions'
EXECUTE and the database's TEMPORARY come from PUBLIC (a REVOKE from pandasync_reporting alone
changes nothing), so this revision takes both from PUBLIC and grants them back to the service's
roles: the migrating user, the database's owner and the owner of the ledger tables (a superuser
needs no grant). The reporting role is left with no schema it may create in: Postgres 15 gives
PUBLIC no CREATE on ``public`` and migration 0002 grants only USAGE, and a function in
``pg_temp`` needs TEMPORARY. The lock stays an advisory lock: a lock table would cost the
reconcile a write and a transaction held across its upstream calls, for each message.

The timeouts are role settings, applied by ``pandasync migrate`` from the configuration
(service/ledger/reporting.py), which also takes TEMPORARY again from PUBLIC where a copy of the
database lost it: database privileges are not copied by ``CREATE DATABASE … TEMPLATE`` nor by
``pg_dump`` without ``--create``.

Revoking EXECUTE on a pg_catalog function needs a superuser, TEMPORARY the database's owner;
without them this revision prints a NOTICE and docs/sql/reporting_role.sql (part 3) does it.
Other roles of this database lose temporary tables and advisory locks too, unless granted
(docs/reporting.md, Access). The downgrade gives both back to PUBLIC.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 17:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "pandasync_reporting"
# Every function that takes an advisory lock (each has a bigint and an (int, int) form);
# unlocking needs no revoke: a session can only release its own locks.
LOCK_FUNCTIONS = (
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
)

# The roles the service runs as, that are not superusers (they need no grant).
SERVICE_ROLES = f"""
SELECT r.rolname FROM pg_roles r
WHERE r.oid IN ((SELECT oid FROM pg_roles WHERE rolname = current_user),
                (SELECT datdba FROM pg_database WHERE datname = current_database()),
                (SELECT relowner FROM pg_class WHERE oid = to_regclass('orders')))
  AND NOT r.rolsuper AND r.rolname <> '{ROLE}'
"""


def _temporary(action: str) -> str:
    """REVOKE (upgrade) or GRANT (downgrade) TEMPORARY on this database for PUBLIC; the service's
    roles other than the owner (who keeps its own) get the opposite."""
    to_from, back = ("FROM", "TO") if action == "REVOKE" else ("TO", "FROM")
    other = "GRANT" if action == "REVOKE" else "REVOKE"
    return f"""
DO $$
DECLARE
    database_owner oid := (SELECT datdba FROM pg_database WHERE datname = current_database());
    service_role name;
BEGIN
    IF NOT pg_has_role(current_user, database_owner, 'USAGE') THEN
        RAISE NOTICE 'TEMPORARY on database % not changed for PUBLIC: % is not its owner; '
            'see part 3 of docs/sql/reporting_role.sql', current_database(), current_user;
        RETURN;
    END IF;
    EXECUTE format('{action} TEMPORARY ON DATABASE %I {to_from} PUBLIC', current_database());
    FOR service_role IN {SERVICE_ROLES} AND r.oid <> database_owner LOOP
        EXECUTE format('{other} TEMPORARY ON DATABASE %I {back} %I', current_database(),
                       service_role);
    END LOOP;
END
$$
"""


def _lock_functions(action: str) -> str:
    """REVOKE (upgrade) or GRANT (downgrade) EXECUTE on the lock functions for PUBLIC; the
    service's roles get the opposite."""
    to_from, back = ("FROM", "TO") if action == "REVOKE" else ("TO", "FROM")
    other = "GRANT" if action == "REVOKE" else "REVOKE"
    names = ", ".join(f"'{name}'" for name in LOCK_FUNCTIONS)
    return f"""
DO $$
DECLARE
    lock_function regprocedure;
    service_role name;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE NOTICE 'advisory lock functions not changed for PUBLIC: % is not a superuser; '
            'see part 3 of docs/sql/reporting_role.sql', current_user;
        RETURN;
    END IF;
    FOR lock_function IN
        SELECT oid::regprocedure FROM pg_proc
        WHERE pronamespace = 'pg_catalog'::regnamespace AND proname IN ({names})
    LOOP
        EXECUTE format('{action} EXECUTE ON FUNCTION %s {to_from} PUBLIC', lock_function);
        FOR service_role IN {SERVICE_ROLES} LOOP
            EXECUTE format('{other} EXECUTE ON FUNCTION %s {back} %I', lock_function,
                           service_role);
        END LOOP;
    END LOOP;
END
$$
"""


# Before Postgres 15 PUBLIC may create in schema public, so the role could create functions
# there. Taking it from PUBLIC could break a service role that relies on it: say so instead.
SCHEMA_CHECK = """
DO $$
BEGIN
    IF has_schema_privilege('public', current_schema(), 'CREATE') THEN
        RAISE NOTICE 'PUBLIC may create objects in schema % (the default before Postgres 15), '
            'so pandasync_reporting may create functions there: see docs/reporting.md, Access',
            current_schema();
    END IF;
END
$$
"""


def upgrade() -> None:
    op.execute(_temporary("REVOKE"))
    op.execute(_lock_functions("REVOKE"))
    op.execute(SCHEMA_CHECK)


def downgrade() -> None:
    op.execute(_lock_functions("GRANT"))
    op.execute(_temporary("GRANT"))
