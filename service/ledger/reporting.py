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
superuser) may change them. See docs/reporting.md.
"""

from __future__ import annotations

from sqlalchemy import text
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
