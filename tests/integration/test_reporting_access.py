"""The pandasync_reporting role: SELECT on the documented tables and views, nothing else.

webhook_inbox is readable without raw_body and headers (the request as received is private).
Its logins' statements and idle transactions are cut short, and it can neither create objects
(temporary ones included) nor take the reconcile's advisory locks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import asyncpg_dsn
from service.ledger.migrations import alembic_config
from service.ledger.models import Platform
from service.ledger.reporting import apply_reporting_access
from tests.integration.test_reporting import known_ledger
from workers.reconcile import ORDER_LOCK_CLASS, order_lock_key

ROLE = "pandasync_reporting"
TABLES = [
    "orders",
    "order_lines",
    "order_status_history",
    "order_price_changes",
    "shipments",
    "shipment_events",
    "refunds",
    "sync_failures",
    "sweep_cursors",
    "refund_sweep_cursors",
    "unmapped_values",
]
VIEWS = [
    "report_daily_sales",
    "report_refunds",
    "report_fulfilment",
    "report_sync_health",
    "report_sales_lines",
    "report_price_changes",
    "report_unmapped_values",
]
INBOX_READABLE = [
    "id", "account_id", "dedupe_key", "received_at", "message_type", "kind", "platform",
    "order_id", "refund_id", "pushed_at", "request_id", "state", "queued_at", "processed_at",
    "signature_state",
]  # fmt: skip
# Readable too, but empty in known_ledger(): the audit trail of `pandasync pay` (migration 0009).
PAYMENT_TABLES = ["payment_attempts"]
PAYMENT_VIEWS = ["report_awaiting_payment"]
# Readable too, empty in known_ledger(): the change feed and the outbound deliveries (0010);
# outbound_endpoints is not (it holds the signing secrets).
FEED_TABLES = ["ledger_changes", "outbound_deliveries", "outbound_delivery_attempts"]
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "sql" / "reporting_role.sql"
# The reconcile's advisory lock of one order of known_ledger(), as workers/reconcile.py takes it.
LOCK_CLASS = ORDER_LOCK_CLASS
LOCK_KEY = order_lock_key("acct", Platform.TAOBAO, "O1")
# The same order in the one-bigint form of the functions (a lock space of its own in Postgres).
LOCK_BIGINT = (LOCK_CLASS << 32) | (LOCK_KEY & 0xFFFFFFFF)
# Every function that takes an advisory lock; ADVISORY_LOCKS calls each on the key of O1.
LOCK_FUNCTIONS = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
]
ADVISORY_LOCKS = [
    *(f"SELECT {function}({LOCK_CLASS}, {LOCK_KEY})" for function in LOCK_FUNCTIONS),
    *(f"SELECT {function}({LOCK_BIGINT})" for function in LOCK_FUNCTIONS),
]
PUBLIC_PRIVILEGES_QUERY = """
SELECT
  EXISTS (SELECT FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
          WHERE d.datname = current_database() AND a.grantee = 0
            AND a.privilege_type = 'TEMPORARY') AS temporary,
  EXISTS (SELECT FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
          WHERE p.pronamespace = 'pg_catalog'::regnamespace
            AND p.proname LIKE 'pg\\_%advisory\\_%lock%' AND p.proname NOT LIKE '%unlock%'
            AND a.grantee = 0) AS advisory_locks
"""

GRANTS_QUERY = f"""
SELECT 'table' AS kind, c.relname AS name, NULL AS col, a.privilege_type
FROM pg_class c, aclexplode(c.relacl) a
WHERE a.grantee = '{ROLE}'::regrole
UNION ALL
SELECT 'column', c.relname, att.attname, a.privilege_type
FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid, aclexplode(att.attacl) a
WHERE a.grantee = '{ROLE}'::regrole
UNION ALL
SELECT 'function', p.proname, NULL, a.privilege_type
FROM pg_proc p, aclexplode(p.proacl) a
WHERE a.grantee = '{ROLE}'::regrole
UNION ALL
SELECT 'schema', n.nspname, NULL, a.privilege_type
FROM pg_namespace n, aclexplode(n.nspacl) a
WHERE a.grantee = '{ROLE}'::regrole
"""
Grant = tuple[str, str, str | None, str]
EXPECTED_GRANTS: set[Grant] = (
    {
        ("table", name, None, "SELECT")
        for name in TABLES + VIEWS + PAYMENT_TABLES + PAYMENT_VIEWS + FEED_TABLES
    }
    | {("column", "webhook_inbox", col, "SELECT") for col in INBOX_READABLE}
    | {("function", "report_timezone", None, "EXECUTE"), ("schema", "public", None, "USAGE")}
)


async def _grants(url: str) -> set[Grant]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch(GRANTS_QUERY)
    finally:
        await conn.close()
    return {(r["kind"], r["name"], r["col"], r["privilege_type"]) for r in rows}


async def test_the_role_cannot_log_in_and_has_no_attributes(db_session: AsyncSession) -> None:
    row = (
        await db_session.execute(
            text(
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                "rolbypassrls FROM pg_roles WHERE rolname = :role"
            ),
            {"role": ROLE},
        )
    ).one()
    assert tuple(row) == (False, False, False, False, False, False)


async def test_the_role_holds_exactly_the_documented_privileges(
    fresh_database_url: str,
) -> None:
    assert await _grants(fresh_database_url) == EXPECTED_GRANTS


async def test_the_role_reads_every_view_and_documented_table(db_session: AsyncSession) -> None:
    await known_ledger(db_session)
    await db_session.execute(text(f"SET LOCAL ROLE {ROLE}"))
    counts = {
        name: await db_session.scalar(text(f"SELECT count(*) FROM {name}"))
        for name in TABLES + VIEWS
    }
    assert counts["orders"] == 6
    assert counts["report_refunds"] == 4
    assert counts["report_daily_sales"] == 6
    assert all(n is not None and n > 0 for n in counts.values()), counts
    inbox = await db_session.scalar(
        text(f"SELECT count(*) FROM (SELECT {', '.join(INBOX_READABLE)} FROM webhook_inbox) i")
    )
    assert inbox == 6
    assert await db_session.scalar(text("SELECT report_timezone()")) == "Asia/Shanghai"


WRITE_CHECKED = [*TABLES, *PAYMENT_TABLES, *FEED_TABLES, "webhook_inbox"]
FORBIDDEN = [
    *(f"INSERT INTO {name} DEFAULT VALUES" for name in WRITE_CHECKED),
    *(
        f"UPDATE {name} SET id = id"
        if name == "outbound_delivery_attempts"
        else f"UPDATE {name} SET account_id = account_id"
        for name in WRITE_CHECKED
    ),
    *(f"DELETE FROM {name}" for name in WRITE_CHECKED),
    "SELECT * FROM outbound_endpoints",
    "TRUNCATE orders",
    "SELECT raw_body FROM webhook_inbox",
    "SELECT headers FROM webhook_inbox",
    "SELECT * FROM webhook_inbox",
    "SELECT * FROM webhook_nonces",
    "SELECT * FROM backfill_runs",
    "SELECT * FROM job_runs",
    "SELECT * FROM alembic_version",
    "SELECT nextval(pg_get_serial_sequence('orders', 'id'))",
    # Postgres 15 and later give PUBLIC no CREATE on the public schema; nor do we.
    "CREATE TABLE report_scratch (id int)",
    "CREATE VIEW report_scratch AS SELECT 1",
]


@pytest.mark.parametrize("statement", FORBIDDEN)
async def test_the_role_may_not(db_session: AsyncSession, statement: str) -> None:
    await db_session.execute(text(f"SET LOCAL ROLE {ROLE}"))
    with pytest.raises(DBAPIError, match="permission denied"):
        await db_session.execute(text(statement))


async def test_downgrade_revokes_what_the_migration_granted(fresh_database_url: str) -> None:
    config = alembic_config(fresh_database_url)
    await asyncio.to_thread(command.downgrade, config, "0001")
    assert await _grants(fresh_database_url) == set()
    conn = await asyncpg.connect(asyncpg_dsn(fresh_database_url))
    try:
        left = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname LIKE 'report%' OR relname IN "
            "('ix_orders_paid_at', 'ix_refunds_resolved_at') "
            "UNION ALL SELECT proname FROM pg_proc WHERE proname = 'report_timezone'"
        )
        # The role itself stays: other databases of the cluster may use it.
        role = await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", ROLE)
    finally:
        await conn.close()
    assert left == []
    assert role == 1
    assert tuple(await _public_privileges(fresh_database_url)) == (True, True)
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _grants(fresh_database_url) == EXPECTED_GRANTS
    assert tuple(await _public_privileges(fresh_database_url)) == (False, False)


async def test_the_sql_script_grants_what_the_migration_grants(
    fresh_database_url: str, analyst_dsn: str
) -> None:
    analyst = urlsplit(analyst_dsn).username
    conn = await asyncpg.connect(asyncpg_dsn(fresh_database_url))
    try:
        await conn.execute(f"DROP OWNED BY {ROLE}")  # this database's grants only
        assert await _grants(fresh_database_url) == set()
        # As a migration run by a user that is not a superuser leaves them.
        await conn.execute(
            "DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', "
            "current_database()); END $$"
        )
        for function in LOCK_FUNCTIONS:
            for arguments in ("bigint", "integer, integer"):
                await conn.execute(f"GRANT EXECUTE ON FUNCTION {function}({arguments}) TO PUBLIC")
        assert tuple(await conn.fetchrow(PUBLIC_PRIVILEGES_QUERY)) == (True, True)
        await conn.execute(SCRIPT.read_text())
        await conn.execute(SCRIPT.read_text())  # idempotent
        assert tuple(await conn.fetchrow(PUBLIC_PRIVILEGES_QUERY)) == (False, False)
        # The role's settings do not reach its members: the script gives them their own.
        analyst_settings = await conn.fetchval(
            "SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = "
            "s.setdatabase WHERE d.datname = current_database() AND s.setrole = $1::regrole",
            analyst,
        )
    finally:
        await conn.close()
    assert await _grants(fresh_database_url) == EXPECTED_GRANTS
    assert sorted(analyst_settings) == [
        "idle_in_transaction_session_timeout=300s",
        "statement_timeout=60s",
    ]


@pytest.mark.parametrize("statement", ADVISORY_LOCKS)
async def test_the_role_may_not_take_the_reconcile_lock_of_an_order(
    db_session: AsyncSession, statement: str
) -> None:
    await db_session.execute(text(f"SET LOCAL ROLE {ROLE}"))
    with pytest.raises(DBAPIError, match="permission denied for function"):
        await db_session.execute(text(statement))


def _login_dsn(url: str, user: str, password: str) -> str:
    parts = urlsplit(asyncpg_dsn(url))
    host = parts.hostname or ""
    address = f"[{host}]" if ":" in host else host
    netloc = f"{user}:{password}@{address}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def _execute_as_admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
async def analyst_dsn(fresh_database_url: str) -> AsyncIterator[str]:
    """A login role reading through the reporting role, created as docs/reporting.md says
    (``GRANT pandasync_reporting TO metabase``); its DSN on the fresh database."""
    name = f"pandasync_t_analyst_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    await _execute_as_admin(
        fresh_database_url,
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
        f"GRANT {ROLE} TO {name}",
    )
    try:
        yield _login_dsn(fresh_database_url, name, password)
    finally:
        await _execute_as_admin(fresh_database_url, f"DROP ROLE {name}")


async def _limit_reporting(url: str) -> None:
    """What `pandasync migrate` does, with one-second limits."""
    await apply_reporting_access(url, statement_timeout_s=1, idle_in_transaction_timeout_s=1)


async def test_a_statement_beyond_the_timeout_is_cancelled(
    fresh_database_url: str, analyst_dsn: str
) -> None:
    await _limit_reporting(fresh_database_url)
    conn = await asyncpg.connect(analyst_dsn)
    try:
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
            await conn.execute("SELECT pg_sleep(2.5)")
        assert time.monotonic() - started < 2
    finally:
        await conn.close()


async def test_an_idle_transaction_is_ended(fresh_database_url: str, analyst_dsn: str) -> None:
    await _limit_reporting(fresh_database_url)
    conn = await asyncpg.connect(analyst_dsn)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.fetchval("SELECT count(*) FROM orders")
        await asyncio.sleep(1.5)
        # The server ends the session; asyncpg says so in one of these words.
        with pytest.raises(
            (
                asyncpg.IdleInTransactionSessionTimeoutError,
                asyncpg.ConnectionDoesNotExistError,
                asyncpg.InterfaceError,
            )
        ):
            await conn.fetchval("SELECT 1")
        assert conn.is_closed()
    finally:
        await conn.close()


CREATE_TEMPORARY = [
    "CREATE TEMP TABLE report_scratch (id int)",
    "CREATE TEMP VIEW report_scratch AS SELECT 1 AS one",
    "CREATE TEMP SEQUENCE report_scratch",
    # A function needs CREATE on a schema: pg_temp is the one schema the role could use.
    "CREATE FUNCTION pg_temp.report_scratch() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE PROCEDURE pg_temp.report_scratch() LANGUAGE sql AS 'SELECT 1'",
]


@pytest.mark.parametrize("statement", CREATE_TEMPORARY)
async def test_a_login_of_the_role_may_not_create_temporary_objects(
    fresh_database_url: str, analyst_dsn: str, statement: str
) -> None:
    await _limit_reporting(fresh_database_url)
    conn = await asyncpg.connect(analyst_dsn)
    try:
        with pytest.raises(
            asyncpg.InsufficientPrivilegeError,
            match="permission denied to create temporary tables",
        ):
            await conn.execute(statement)
        # Nor in any schema it can reach.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute(
                "CREATE FUNCTION report_scratch() RETURNS int LANGUAGE sql AS 'SELECT 1'"
            )
    finally:
        await conn.close()


async def test_a_login_of_the_role_may_not_take_the_reconcile_lock(
    fresh_database_url: str, analyst_dsn: str
) -> None:
    conn = await asyncpg.connect(analyst_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, LOCK_KEY)
    finally:
        await conn.close()


@pytest.fixture
async def service_dsn(fresh_database_url: str) -> AsyncIterator[str]:
    """A non-superuser login that owns the fresh database, as the service's role would."""
    name = f"pandasync_t_service_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    database = urlsplit(fresh_database_url).path.strip("/")
    await _execute_as_admin(
        fresh_database_url,
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
        f'ALTER DATABASE "{database}" OWNER TO {name}',
    )
    try:
        yield _login_dsn(fresh_database_url, name, password)
    finally:
        await _execute_as_admin(
            fresh_database_url,
            f'ALTER DATABASE "{database}" OWNER TO CURRENT_USER',
            f"DROP OWNED BY {name}",  # the privileges the migration granted it here
            f"DROP ROLE {name}",
        )


async def test_the_service_role_keeps_its_locks_and_temporary_tables(
    fresh_database_url: str, service_dsn: str
) -> None:
    config = alembic_config(fresh_database_url)
    # The migration grants back what it takes from PUBLIC to the database's owner.
    await asyncio.to_thread(command.downgrade, config, "0006")  # the revision before 0007
    await asyncio.to_thread(command.upgrade, config, "head")
    await _limit_reporting(fresh_database_url)
    conn = await asyncpg.connect(service_dsn)
    try:
        assert (
            await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            is False
        )
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, LOCK_KEY)
        assert await conn.fetchval("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, LOCK_KEY)
        async with conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({LOCK_BIGINT})")
        await conn.execute("CREATE TEMP TABLE scratch (id int)")
    finally:
        await conn.close()


async def _public_privileges(url: str) -> asyncpg.Record:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await conn.fetchrow(PUBLIC_PRIVILEGES_QUERY)
    finally:
        await conn.close()
    assert row is not None
    return row
