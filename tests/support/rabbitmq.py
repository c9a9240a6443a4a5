"""A RabbitMQ of the test's own: a vhost made for it (``rabbitmqctl``), deleted after.

``PANDASYNC_TEST_RABBITMQ_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``) names the
server. dramatiq's queue names are fixed (``reconcile``), so test runs side by side keep apart by
vhost; without ``rabbitmqctl`` (a server on another host) the default vhost is used and its
reconcile queues are emptied before and after. Without a reachable server the test is skipped on
a laptop and fails when ``CI`` is set, as for Redis.
"""

from __future__ import annotations

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


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """An ``amqp://`` URL of a vhost nobody else uses, empty."""
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
