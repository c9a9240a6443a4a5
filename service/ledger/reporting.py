"""Database settings the report_* views rely on, applied by ``pandasync migrate``.

- ``pandasync.reporting_tz``: views cannot read Settings, so ``REPORTING_TIMEZONE`` is stored as
  the database default of this custom setting; ``report_timezone()`` (migration 0002) reads it,
  falling back to Asia/Shanghai. A session may override it:
  ``SET pandasync.reporting_tz = 'Europe/Berlin'``.
- ``jit = off`` and ``random_page_cost = 1.1``, but only where the server still has Postgres'
  defaults (an administrator's choice is kept). Measured on a million orders: JIT compiles for
  0.5 to 1.5 s before report queries that then run in about 0.1 s, and the default
  random_page_cost (4, spinning disks) makes the planner scan whole line and parcel tables
  instead of probing their indexes.

Both are ``ALTER DATABASE … SET``: new sessions see them, and only the database's owner (or a
superuser) may change them.

The limits of the reporting role (:func:`set_reporting_access`):

- ``statement_timeout`` and ``idle_in_transaction_session_timeout`` on pandasync_reporting, and
  on each login role that is a member of it: Postgres applies a role's settings only to a
  session that logs in as that role, never to its members, and pandasync_reporting cannot log
  in. A member gets them for this database (``ALTER ROLE … IN DATABASE``), which wins over its
  own role-wide settings. They are defaults against accidents: a session may ``SET`` another.
- What migration 0007 takes from PUBLIC, again where it is back: TEMPORARY on this database
  (a copy of the database loses it: ``CREATE DATABASE … TEMPLATE`` and ``pg_dump`` without
  ``--create`` keep no database privileges), and EXECUTE on the advisory lock functions (when
  0007 ran as a user that is not a superuser).

See docs/reporting.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

TIMEZONE_SETTING = "pandasync.reporting_tz"
DEFAULT_TIMEZONE = "Asia/Shanghai"
# Applied only where pg_settings says the server runs with Postgres' default.
PLANNER_SETTINGS = {"jit": "off", "random_page_cost": "1.1"}


class ReportingSettingsError(Exception):
    """A reporting setting could not be stored; ``reason`` is the server's message."""

    def __init__(self, setting: str, value: str, reason: str) -> None:
        super().__init__(f"could not set {setting} to {value!r}: {reason}")
        self.setting = setting
        self.value = value
        self.reason = reason


async def _alter_database(conn: AsyncConnection, setting: str, value: str) -> None:
    # ALTER DATABASE takes no bind parameters: let the server quote name and value.
    statement = await conn.scalar(
        text(
            "SELECT format('ALTER DATABASE %I SET %s = %L', current_database(), "
            "CAST(:name AS text), CAST(:value AS text))"
        ),
        {"name": setting, "value": value},
    )
    await conn.execute(text(str(statement)))


async def set_reporting_settings(conn: AsyncConnection, timezone: str) -> dict[str, str]:
    """Store the reporting settings on the current database; returns what was set.

    Checks that Postgres knows the zone first, so a name Python accepts but the server's time
    zone database lacks cannot break every report query.
    """
    applied: dict[str, str] = {}
    setting, value = TIMEZONE_SETTING, timezone
    try:
        await conn.execute(text("SELECT now() AT TIME ZONE CAST(:tz AS text)"), {"tz": timezone})
        await _alter_database(conn, setting, value)
        applied[setting] = value
        defaults = await conn.execute(
            text("SELECT name FROM pg_settings WHERE name = ANY(:names) AND source = 'default'"),
            {"names": list(PLANNER_SETTINGS)},
        )
        for (setting,) in defaults.all():
            value = PLANNER_SETTINGS[setting]
            await _alter_database(conn, setting, value)
            applied[setting] = value
    except DBAPIError as error:
        raise ReportingSettingsError(setting, value, str(error.orig).strip()) from None
    return applied


async def apply_reporting_settings(url: str, timezone: str) -> dict[str, str]:
    """:func:`set_reporting_settings` on the database at ``url``, committed."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            applied = await set_reporting_settings(conn, timezone)
            await conn.commit()
    finally:
        await engine.dispose()
    return applied


REPORTING_ROLE = "pandasync_reporting"

# The service's own roles (the migrating user, the database's owner, the ledger tables' owner),
# kept out of the reporting limits: a migration may well run longer than an analyst's query.
_SERVICE_ROLES = text(
    """
    SELECT r.rolname AS name, r.rolsuper AS superuser, r.oid = d.datdba AS owns_database
    FROM pg_roles r, pg_database d
    WHERE d.datname = current_database()
      AND r.oid IN ((SELECT oid FROM pg_roles WHERE rolname = current_user), d.datdba,
                    (SELECT relowner FROM pg_class WHERE oid = to_regclass('orders')))
    """
)
# Login roles that read through the reporting role; superusers are members of every role.
_REPORTING_LOGINS = text(
    """
    SELECT r.rolname FROM pg_roles r
    WHERE r.rolcanlogin AND NOT r.rolsuper AND r.rolname <> :role
      AND pg_has_role(r.oid, :role, 'MEMBER') AND r.rolname <> ALL(:service_roles)
    ORDER BY r.rolname
    """
)
_PUBLIC_HAS_TEMPORARY = text(
    """
    SELECT EXISTS (
        SELECT FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
        WHERE d.datname = current_database() AND a.grantee = 0
          AND a.privilege_type = 'TEMPORARY')
    """
)
_MAY_GRANT_ON_DATABASE = text(
    "SELECT pg_has_role(current_user, datdba, 'USAGE') FROM pg_database "
    "WHERE datname = current_database()"
)
# Every function that takes an advisory lock (migration 0007); unlocking needs no revoke.
_LOCK_FUNCTIONS = text(
    r"""
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'pg_catalog'::regnamespace
      AND p.proname LIKE 'pg\_%advisory\_%lock%' AND p.proname NOT LIKE '%unlock%'
    """
)
_PUBLIC_HAS_ADVISORY_LOCKS = text(
    r"""
    SELECT EXISTS (
        SELECT FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND p.proname LIKE 'pg\_%advisory\_%lock%' AND p.proname NOT LIKE '%unlock%'
          AND a.grantee = 0)
    """
)
_IS_SUPERUSER = text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")


@dataclass(frozen=True, slots=True)
class AccessReport:
    """What :func:`set_reporting_access` changed, and what it could not (each with the fix)."""

    applied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ALTER ROLE and GRANT take no bind parameters: the server quotes names and values.
_ALTER_ROLE = (
    "SELECT format('ALTER ROLE %I SET %s = %L', "
    "CAST(:name AS text), CAST(:setting AS text), CAST(:value AS text))"
)
_ALTER_ROLE_IN_THIS_DATABASE = (
    "SELECT format('ALTER ROLE %I IN DATABASE %I SET %s = %L', "
    "CAST(:name AS text), current_database(), CAST(:setting AS text), CAST(:value AS text))"
)
_REVOKE_PUBLIC_TEMPORARY = (
    "SELECT format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database())"
)
_REVOKE_PUBLIC_EXECUTE = (
    "SELECT format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', CAST(:function AS regprocedure))"
)
_GRANT_EXECUTE = (
    "SELECT format('GRANT EXECUTE ON FUNCTION %s TO %I', "
    "CAST(:function AS regprocedure), CAST(:name AS text))"
)
_GRANT_TEMPORARY = (
    "SELECT format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), CAST(:name AS text))"
)


def role_timeouts(statement_timeout_s: int, idle_in_transaction_timeout_s: int) -> dict[str, str]:
    """The reporting roles' settings; 0 turns a limit off, as in Postgres."""
    return {
        "statement_timeout": f"{statement_timeout_s}s",
        "idle_in_transaction_session_timeout": f"{idle_in_transaction_timeout_s}s",
    }


async def _run_built(conn: AsyncConnection, build: str, params: dict[str, str]) -> str | None:
    """Run the statement ``build`` returns; the server's refusal, if any."""
    try:
        statement = await conn.scalar(text(build), params)
        await conn.execute(text(str(statement)))
    except DBAPIError as error:
        return str(error.orig).strip()
    return None


async def _set_timeouts(
    conn: AsyncConnection, report: AccessReport, timeouts: dict[str, str], service: list[str]
) -> None:
    logins = (
        await conn.scalars(_REPORTING_LOGINS, {"role": REPORTING_ROLE, "service_roles": service})
    ).all()
    # The role itself for every database (the reference value); its logins for this one.
    targets = [
        (REPORTING_ROLE, _ALTER_ROLE),
        *((login, _ALTER_ROLE_IN_THIS_DATABASE) for login in logins),
    ]
    limited = []
    for name, alter in targets:
        refusals = [
            await _run_built(conn, alter, {"name": name, "setting": setting, "value": value})
            for setting, value in timeouts.items()
        ]
        refusal = next((reason for reason in refusals if reason), None)
        if refusal:
            report.warnings.append(
                f"could not set the timeouts of {name}: {refusal}; run "
                "docs/sql/reporting_role.sql part 3 as a role with CREATEROLE"
            )
        else:
            limited.append(name)
    if limited:
        settings = ", ".join(f"{setting}={value}" for setting, value in timeouts.items())
        report.applied.append(f"{settings} for {', '.join(limited)}")


async def _take_temporary(
    conn: AsyncConnection, report: AccessReport, service_roles: Sequence[Row[Any]]
) -> None:
    if not await conn.scalar(_PUBLIC_HAS_TEMPORARY):
        return
    refusal: str | None = "the user is not the database's owner"
    if await conn.scalar(_MAY_GRANT_ON_DATABASE):
        refusal = await _run_built(conn, _REVOKE_PUBLIC_TEMPORARY, {})
    # The service keeps it (the owner holds its own); superusers need no grant.
    for service in service_roles:
        if refusal is None and not (service.superuser or service.owns_database):
            refusal = await _run_built(conn, _GRANT_TEMPORARY, {"name": service.name})
    if refusal is None:
        report.applied.append("TEMPORARY on this database taken from PUBLIC")
    else:
        report.warnings.append(
            f"PUBLIC (so {REPORTING_ROLE}) may create temporary tables and functions: "
            f"{refusal}; run docs/sql/reporting_role.sql part 3 as the database's owner"
        )


async def _take_advisory_locks(
    conn: AsyncConnection, report: AccessReport, service_roles: Sequence[Row[Any]]
) -> None:
    # Still there when migration 0007 ran as a user that is not a superuser.
    if not await conn.scalar(_PUBLIC_HAS_ADVISORY_LOCKS):
        return
    refusal = None if await conn.scalar(_IS_SUPERUSER) else "the user is not a superuser"
    for lock_function in (await conn.scalars(_LOCK_FUNCTIONS)).all():
        if refusal is None:
            refusal = await _run_built(conn, _REVOKE_PUBLIC_EXECUTE, {"function": lock_function})
        for service in service_roles:
            if refusal is None and not service.superuser:
                refusal = await _run_built(
                    conn, _GRANT_EXECUTE, {"function": lock_function, "name": service.name}
                )
    if refusal is None:
        report.applied.append("advisory lock functions taken from PUBLIC")
    else:
        report.warnings.append(
            f"PUBLIC (so {REPORTING_ROLE}) may take advisory locks and stall the sync of any "
            f"order: {refusal}; run docs/sql/reporting_role.sql part 3 as a superuser"
        )


async def set_reporting_access(
    conn: AsyncConnection, *, statement_timeout_s: int, idle_in_transaction_timeout_s: int
) -> AccessReport:
    """Apply the reporting role's limits on ``conn``, an autocommit connection (each step
    stands alone).

    A step the user may not take (ALTER ROLE needs CREATEROLE, TEMPORARY the database's owner,
    the lock functions a superuser) becomes a warning, and the others go on.
    """
    report = AccessReport()
    exists = await conn.scalar(
        text("SELECT to_regrole(:role) IS NOT NULL"), {"role": REPORTING_ROLE}
    )
    if not exists:
        report.warnings.append(
            f"role {REPORTING_ROLE} does not exist: run docs/sql/reporting_role.sql as a role "
            "that may create roles"
        )
        return report
    service_roles = (await conn.execute(_SERVICE_ROLES)).all()
    timeouts = role_timeouts(statement_timeout_s, idle_in_transaction_timeout_s)
    await _set_timeouts(conn, report, timeouts, [service.name for service in service_roles])
    await _take_temporary(conn, report, service_roles)
    await _take_advisory_locks(conn, report, service_roles)
    return report


async def apply_reporting_access(
    url: str, *, statement_timeout_s: int, idle_in_transaction_timeout_s: int
) -> AccessReport:
    """:func:`set_reporting_access` on the database at ``url``."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return await set_reporting_access(
                conn,
                statement_timeout_s=statement_timeout_s,
                idle_in_transaction_timeout_s=idle_in_transaction_timeout_s,
            )
    finally:
        await engine.dispose()
