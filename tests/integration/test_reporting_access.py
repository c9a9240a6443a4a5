"""The pandasync_reporting role: SELECT on the documented tables and views, nothing else.

webhook_inbox is readable without raw_body and headers (the request as received is private).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from service.cli import alembic_config
from service.db import asyncpg_dsn
from tests.integration.test_reporting import known_ledger

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
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "sql" / "reporting_role.sql"

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
    {("table", name, None, "SELECT") for name in TABLES + VIEWS}
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


FORBIDDEN = [
    *(f"INSERT INTO {name} DEFAULT VALUES" for name in [*TABLES, "webhook_inbox"]),
    *(f"UPDATE {name} SET account_id = account_id" for name in [*TABLES, "webhook_inbox"]),
    *(f"DELETE FROM {name}" for name in [*TABLES, "webhook_inbox"]),
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
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _grants(fresh_database_url) == EXPECTED_GRANTS


async def test_the_sql_script_grants_what_the_migration_grants(fresh_database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(fresh_database_url))
    try:
        await conn.execute(f"DROP OWNED BY {ROLE}")  # this database's grants only
        assert await _grants(fresh_database_url) == set()
        await conn.execute(SCRIPT.read_text())
        await conn.execute(SCRIPT.read_text())  # idempotent
    finally:
        await conn.close()
    assert await _grants(fresh_database_url) == EXPECTED_GRANTS
