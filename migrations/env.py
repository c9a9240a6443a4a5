"""Alembic environment: async (asyncpg), with lock and statement timeouts on every migration.

The URL comes from the Alembic config's ``sqlalchemy.url`` when a caller set it (the CLI and the
tests do), otherwise from ``PANDASYNC_DATABASE_URL``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import get_settings
from service.ledger.models import Base

config = context.config
target_metadata = Base.metadata

# A migration must never queue behind a long transaction holding a lock on a busy table,
# nor run unbounded: fail fast and retry at a quiet moment instead.
LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "10min"


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    if not url:
        raise SystemExit(
            "set PANDASYNC_DATABASE_URL, or run `pandasync migrate` for the embedded one"
        )
    return url


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Views and their helper objects are managed by hand-written migrations, not the models.
    return not (
        type_ == "table"
        and reflected
        and compare_to is None
        and name
        and name.startswith("report_")
    )


def do_run_migrations(connection: Connection) -> None:
    connection.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
    connection.execute(text(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
    # The SETs hold for the session; commit them so each migration gets its own transaction
    # (and may open an autocommit block, e.g. for CREATE INDEX CONCURRENTLY).
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        include_object=include_object,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
        await connection.commit()
    await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        context.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
