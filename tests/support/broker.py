"""The brokers the tests run on, and reconcile messages as a backlog leaves them: enqueued some
time ago."""

from __future__ import annotations

import time
from dataclasses import replace

import dramatiq

from service.broker import reconcile_message

# The ids of the ``broker_url`` fixture's parameters (tests/conftest.py), for tests that take
# a broker URL of their own.
BROKERS = ["redis", "rabbitmq"]


def enqueue_aged(broker: dramatiq.Broker, age_s: float, order_id: str = "backlog") -> None:
    """A reconcile waiting in ``broker`` since ``age_s`` ago."""
    message = reconcile_message("acct", "1688", order_id, source="webhook")
    broker.enqueue(replace(message, message_timestamp=int((time.time() - age_s) * 1000)))
