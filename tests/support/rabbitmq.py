"""A RabbitMQ of the test's own: a vhost of this test run's (``rabbitmqctl``), its reconcile
queues deleted before and after each test.

``PANDASYNC_TEST_RABBITMQ_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``) names the
server. dramatiq's queue names are fixed (``reconcile``), so test runs side by side keep apart by
vhost: one per run, made at its first RabbitMQ test and deleted at the end (each ``rabbitmqctl``
call starts an Erlang VM, seconds each: one vhost per test cost more than most tests). The tests
of a run follow one another and leave no process behind, and the product declares no queue but
the reconcile ones, so deleting those gives each test an empty broker. Without ``rabbitmqctl``
(a server on another host) the default vhost is used the same way. Without a reachable server
the test is skipped on a laptop and fails when ``CI`` is set, as for Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pika  # type: ignore[import-untyped]
import pytest

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
ON_CI = bool(os.environ.get("CI"))
RECONCILE_QUEUES = ("reconcile", "reconcile.DQ", "reconcile.XQ")


def server_url() -> str:
    return os.environ.get("PANDASYNC_TEST_RABBITMQ_URL", DEFAULT_URL)


def require_server(url: str) -> None:
    """Skip (fail on CI) unless RabbitMQ at ``url`` accepts a connection."""
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 3
    try:
        pika.BlockingConnection(parameters).close()
    except Exception as error:
        message = f"RabbitMQ at {url} is unreachable: {type(error).__name__} {error}"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def _purge(url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for name in RECONCILE_QUEUES:
            channel.queue_delete(queue=name)
    finally:
        connection.close()


@contextlib.contextmanager
def vhost_of_its_own() -> Iterator[str]:
    """An ``amqp://`` URL of a vhost made for the caller and deleted after (the server's
    default vhost, its reconcile queues emptied, without ``rabbitmqctl``)."""
    base = server_url()
    require_server(base)
    parts = urlsplit(base)
    local = parts.hostname in ("127.0.0.1", "localhost") and shutil.which("rabbitmqctl")
    if not local:
        _purge(base)
        yield base
        _purge(base)
        return
    vhost = f"pandasync-test-{uuid.uuid4().hex[:10]}"
    user = parts.username or "guest"
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))
    finally:
        _ctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def rabbitmq_run_url() -> Iterator[str]:
    """An ``amqp://`` URL of a vhost this test run alone uses (made once, deleted at the end)."""
    with vhost_of_its_own() as url:
        yield url


@pytest.fixture
def rabbitmq_url(rabbitmq_run_url: str) -> Iterator[str]:
    """An ``amqp://`` URL of a vhost nobody else uses, its reconcile queues empty."""
    _purge(rabbitmq_run_url)
    yield rabbitmq_run_url
    _purge(rabbitmq_run_url)
