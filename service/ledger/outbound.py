"""Outbound webhooks in the ledger: endpoints, the fan-out of the change feed into deliveries,
claiming due deliveries, recording each attempt, disabling an endpoint that keeps failing.

A delivery's life::

    (fan-out) ──▶ pending ──(claimed: attempts+1, next_attempt_at = now + lease)──▶ sending
    sending ──2xx──▶ delivered
    sending ──anything else──▶ pending (next_attempt_at = now + the schedule's next delay)
                          └──(the schedule ran out)──▶ failed
    sending ──(the sender died)──▶ pending again once the lease has passed (sent again)
    delivered | failed ──(replay)──▶ pending, attempts 0

So a delivery is sent at least once; a receiver dedupes by ``webhook-id`` (one per endpoint and
change). A pending delivery is not claimed while an earlier change of the same order to the same
endpoint is pending: per order and endpoint, events arrive in the feed's order.

The fan-out reads the feed by transaction horizon (``service.ledger.changes``): each endpoint
remembers the horizon it has fanned out up to (``feed_horizon``) and reads ``tx_id >=`` it again
next time; the unique (endpoint, change) makes reading a row twice harmless. A new endpoint gets
the changes recorded (their transaction started) from its creation on: its first horizon may be
held back by any long transaction on the server, so the horizon alone would not say that.

The signing secret is stored as created (it is the HMAC key: a hash of it could not sign);
the reporting role cannot read ``outbound_endpoints`` and no log line carries it.
"""

from __future__ import annotations

import base64
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from service.db import rowcount, session_scope
from service.ledger.models import ChangeKind, DeliveryState

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not one
# How long a claimed delivery stays claimed beyond its request's timeout (which bounds the
# whole request): a sender that dies mid-request leaves it to be sent again after that.
LEASE_MARGIN_S = 5.0
ERROR_LIMIT = 2000


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: int
    url: str
    event_types: list[str] | None
    account_ids: list[str] | None
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Due:
    """A claimed delivery and what to send."""

    id: int
    endpoint_id: int
    change_id: int
    url: str
    secret: str
    attempts: int
    kind: str
    payload: dict[str, Any]
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    change_id: int
    kind: str
    order: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_latency_ms: int | None
    last_error: str | None
    delivered_at: datetime | None


_ENDPOINT_COLUMNS = (
    "SELECT id, url, event_types, account_ids, enabled, disabled_at, disabled_reason, "
    "created_at{extra} FROM outbound_endpoints"
)
_LIST_ENDPOINTS = text(_ENDPOINT_COLUMNS.format(extra="") + " ORDER BY id")
_GET_ENDPOINT = text(_ENDPOINT_COLUMNS.format(extra=", secret") + " WHERE id = :id")


def message_id(endpoint_id: int, change_id: int) -> str:
    """The ``webhook-id`` of a delivery: the same on every attempt and replay."""
    return f"pds_{endpoint_id}_{change_id}"


async def add_endpoint(
    session: AsyncSession,
    url: str,
    event_types: Sequence[str] = (),
    account_ids: Sequence[str] = (),
) -> tuple[int, str]:
    """Store a new endpoint; its id and its secret (shown to the operator once)."""
    unknown = sorted(set(event_types) - {k.value for k in ChangeKind})
    if unknown:
        raise ValueError(f"unknown event type(s): {', '.join(unknown)}")
    secret = new_secret()
    found = await session.execute(
        text(
            "INSERT INTO outbound_endpoints (url, event_types, account_ids, secret) "
            "VALUES (:url, :events, :accounts, :secret) RETURNING id"
        ),
        {
            "url": url,
            "events": list(event_types) or None,
            "accounts": list(account_ids) or None,
            "secret": secret,
        },
    )
    return int(found.scalar_one()), secret


async def list_endpoints(session: AsyncSession) -> list[Endpoint]:
    rows = await session.execute(_LIST_ENDPOINTS)
    return [Endpoint(*row) for row in rows.all()]


async def get_endpoint(session: AsyncSession, endpoint_id: int) -> tuple[Endpoint, str] | None:
    """The endpoint and its secret."""
    row = (
        await session.execute(
            _GET_ENDPOINT,
            {"id": endpoint_id},
        )
    ).one_or_none()
    return None if row is None else (Endpoint(*row[:-1]), str(row[-1]))


async def set_enabled(
    session: AsyncSession, endpoint_id: int, enabled: bool, reason: str | None = None
) -> bool:
    """Enable or disable the endpoint; False when there is no such endpoint."""
    found = await session.execute(
        text(
            "UPDATE outbound_endpoints SET enabled = :enabled, "
            "disabled_at = CASE WHEN :enabled THEN NULL ELSE now() END, "
            "disabled_reason = CASE WHEN :enabled THEN NULL ELSE :reason END "
            "WHERE id = :id RETURNING id"
        ),
        {"id": endpoint_id, "enabled": enabled, "reason": reason},
    )
    return found.scalar_one_or_none() is not None


# --- the fan-out --------------------------------------------------------------------------------

_FAN_OUT = text(
    """
INSERT INTO outbound_deliveries (endpoint_id, change_id, account_id, platform, order_id)
SELECT e.id, c.id, c.account_id, c.platform, c.order_id
FROM outbound_endpoints e
JOIN ledger_changes c ON c.tx_id >= e.feed_horizon
WHERE e.enabled
  AND c.recorded_at >= e.created_at
  AND (e.event_types IS NULL OR c.kind = ANY (e.event_types))
  AND (e.account_ids IS NULL OR c.account_id = ANY (e.account_ids))
ORDER BY c.id
ON CONFLICT ON CONSTRAINT uq_outbound_deliveries_endpoint_id_change_id DO NOTHING
"""
)
_ADVANCE = text("UPDATE outbound_endpoints SET feed_horizon = :horizon WHERE enabled")
_HORIZON = text("SELECT (pg_snapshot_xmin(pg_current_snapshot()))::text::bigint")


async def fan_out(conn: AsyncConnection) -> int:
    """Make the deliveries of every change not yet fanned out, for every enabled endpoint;
    how many were made. Run it in a REPEATABLE READ transaction: the horizon and the rows
    read must come from the same snapshot."""
    horizon = (await conn.execute(_HORIZON)).scalar_one()
    made = (await conn.execute(_FAN_OUT)).rowcount
    await conn.execute(_ADVANCE, {"horizon": horizon})
    return int(made)


# --- sending --------------------------------------------------------------------------------------

_CLAIM = text(
    """
UPDATE outbound_deliveries d
SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => :lease)
FROM outbound_endpoints e, ledger_changes c
WHERE d.id IN (
    SELECT d2.id FROM outbound_deliveries d2
    JOIN outbound_endpoints e2 ON e2.id = d2.endpoint_id
    WHERE d2.state = 'pending' AND d2.next_attempt_at <= now() AND e2.enabled
      AND NOT EXISTS (
        SELECT FROM outbound_deliveries p
        WHERE p.endpoint_id = d2.endpoint_id AND p.account_id = d2.account_id
          AND p.platform = d2.platform AND p.order_id = d2.order_id
          AND p.change_id < d2.change_id AND p.state = 'pending')
    ORDER BY d2.next_attempt_at, d2.change_id
    LIMIT :limit
    FOR UPDATE OF d2 SKIP LOCKED)
  AND e.id = d.endpoint_id AND c.id = d.change_id
RETURNING d.id, d.endpoint_id, d.change_id, e.url, e.secret, d.attempts, c.kind, c.payload,
          c.recorded_at
"""
)


async def claim(session: AsyncSession, limit: int, lease_s: float) -> list[Due]:
    """Claim up to ``limit`` due deliveries for ``lease_s`` seconds (commit before sending)."""
    rows = await session.execute(_CLAIM, {"limit": limit, "lease": lease_s})
    return sorted((Due(*row) for row in rows.all()), key=lambda due: due.change_id)


def next_delay(attempts: int, schedule: Sequence[float]) -> float | None:
    """Seconds before the next attempt after ``attempts`` failed ones (±20% jitter, so
    deliveries failed together do not return together); None once the schedule has run out."""
    if attempts > len(schedule):
        return None
    return schedule[attempts - 1] * random.uniform(0.8, 1.2)


# The attempt's log row and the delivery's new state, in one statement (one round trip).
_DELIVERED = text(
    "WITH logged AS (INSERT INTO outbound_delivery_attempts "
    "(delivery_id, status_code, latency_ms, error) VALUES (:id, :status, :latency, :error)) "
    "UPDATE outbound_deliveries SET state = 'delivered', delivered_at = now(), "
    "last_status_code = :status, last_latency_ms = :latency, last_error = NULL "
    "WHERE id = :id"
)
_FAILED_ATTEMPT = text(
    "WITH logged AS (INSERT INTO outbound_delivery_attempts "
    "(delivery_id, status_code, latency_ms, error) VALUES (:id, :status, :latency, :error)) "
    "UPDATE outbound_deliveries SET state = :state, "
    "next_attempt_at = now() + make_interval(secs => :delay), "
    "last_status_code = :status, last_latency_ms = :latency, last_error = :error "
    "WHERE id = :id"
)


async def record_attempt(
    session: AsyncSession,
    due: Due,
    *,
    status: int | None,
    latency_ms: int,
    error: str | None,
    schedule: Sequence[float],
) -> DeliveryState:
    """Log the attempt and move the delivery on; its new state."""
    error = None if error is None else error[:ERROR_LIMIT]
    params = {"id": due.id, "status": status, "latency": latency_ms, "error": error}
    if status is not None and 200 <= status < 300:
        await session.execute(_DELIVERED, params)
        return DeliveryState.DELIVERED
    delay = next_delay(due.attempts, schedule)
    state = DeliveryState.PENDING if delay is not None else DeliveryState.FAILED
    await session.execute(_FAILED_ATTEMPT, {**params, "state": state.value, "delay": delay or 0.0})
    return state


# The first failed attempt since the endpoint's last success (or ever).
_FAILING_SINCE = text(
    """
SELECT min(a.attempted_at)
FROM outbound_delivery_attempts a JOIN outbound_deliveries d ON d.id = a.delivery_id
WHERE d.endpoint_id = :id
  AND a.attempted_at > coalesce((
    SELECT max(s.attempted_at)
    FROM outbound_delivery_attempts s JOIN outbound_deliveries sd ON sd.id = s.delivery_id
    WHERE sd.endpoint_id = :id AND s.status_code BETWEEN 200 AND 299), '-infinity')
"""
)


async def disable_if_failing(
    session: AsyncSession, endpoint_id: int, after_s: float
) -> datetime | None:
    """Disable the endpoint when every attempt since ``after_s`` seconds ago (and before) has
    failed; when it has been failing since (None: not disabled)."""
    since: datetime | None = (
        await session.execute(_FAILING_SINCE, {"id": endpoint_id})
    ).scalar_one()
    if since is None:
        return None
    now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
    if now - since < timedelta(seconds=after_s):
        return None
    reason = f"every delivery failed since {since.isoformat(timespec='seconds')}"
    found = await session.execute(
        text(
            "UPDATE outbound_endpoints SET enabled = false, disabled_at = now(), "
            "disabled_reason = :reason WHERE id = :id AND enabled RETURNING id"
        ),
        {"id": endpoint_id, "reason": reason},
    )
    return since if found.scalar_one_or_none() is not None else None


# --- replay and the delivery log ----------------------------------------------------------------


async def replay_delivery(session: AsyncSession, endpoint_id: int, delivery_id: int) -> bool:
    found = await session.execute(
        text(
            "UPDATE outbound_deliveries SET state = 'pending', attempts = 0, "
            "next_attempt_at = now() WHERE id = :id AND endpoint_id = :endpoint RETURNING id"
        ),
        {"id": delivery_id, "endpoint": endpoint_id},
    )
    return found.scalar_one_or_none() is not None


async def replay_range(
    session: AsyncSession, endpoint_id: int, since: datetime, until: datetime
) -> int:
    """Send again (or for the first time) every change recorded in [since, until) that the
    endpoint's filters select; how many deliveries that makes pending."""
    found = await session.execute(
        text(
            """
INSERT INTO outbound_deliveries (endpoint_id, change_id, account_id, platform, order_id)
SELECT e.id, c.id, c.account_id, c.platform, c.order_id
FROM outbound_endpoints e JOIN ledger_changes c
  ON c.recorded_at >= :since AND c.recorded_at < :until
WHERE e.id = :endpoint
  AND (e.event_types IS NULL OR c.kind = ANY (e.event_types))
  AND (e.account_ids IS NULL OR c.account_id = ANY (e.account_ids))
ORDER BY c.id
ON CONFLICT ON CONSTRAINT uq_outbound_deliveries_endpoint_id_change_id
DO UPDATE SET state = 'pending', attempts = 0, next_attempt_at = now()
RETURNING id
"""
        ),
        {"endpoint": endpoint_id, "since": since, "until": until},
    )
    return len(found.all())


_DELIVERIES = text(
    "SELECT d.id, d.change_id, c.kind, c.platform || ':' || c.order_id, d.state, "
    "d.attempts, d.next_attempt_at, d.last_status_code, d.last_latency_ms, "
    "d.last_error, d.delivered_at "
    "FROM outbound_deliveries d JOIN ledger_changes c ON c.id = d.change_id "
    "WHERE d.endpoint_id = :id AND (NOT :failed_only OR "
    "(d.last_error IS NOT NULL AND d.state <> 'delivered')) ORDER BY d.id DESC LIMIT :limit"
)


async def deliveries(
    session: AsyncSession, endpoint_id: int, *, failed_only: bool = False, limit: int = 50
) -> list[DeliveryRow]:
    """The endpoint's latest deliveries, newest first; ``failed_only``: those whose last
    attempt failed (pending again or failed for good)."""
    rows = await session.execute(
        _DELIVERIES, {"id": endpoint_id, "limit": limit, "failed_only": failed_only}
    )
    return [DeliveryRow(*row) for row in rows.all()]


_PURGE = text(
    "DELETE FROM outbound_deliveries WHERE id IN ("
    " SELECT id FROM outbound_deliveries"
    " WHERE state <> 'pending' AND created_at < now() - make_interval(secs => :age_s)"
    " LIMIT :batch)"
)


async def purge_finished(
    sessions: async_sessionmaker[AsyncSession], older_than_s: float, *, batch: int = 5000
) -> int:
    """Delete deliveries no longer pending made more than ``older_than_s`` ago, with their
    attempts (the foreign key cascades); how many. A transaction per batch, so a first purge
    of a large backlog holds no lock for long. The change feed keeps the changes themselves:
    ``replay_range`` makes deliveries of them again."""
    purged = 0
    while True:
        async with session_scope(sessions) as session:
            done = rowcount(await session.execute(_PURGE, {"age_s": older_than_s, "batch": batch}))
        purged += done
        if done < batch:
            return purged


async def pending_summary(session: AsyncSession) -> tuple[int, timedelta | None]:
    """Deliveries pending (waiting to be sent or retried), and how long ago the oldest was made."""
    count, oldest = (
        await session.execute(
            text(
                "SELECT count(*), now() - min(created_at) FROM outbound_deliveries "
                "WHERE state = 'pending'"
            )
        )
    ).one()
    return int(count), oldest


async def pending_count(session: AsyncSession) -> int:
    found = await session.execute(
        text("SELECT count(*) FROM outbound_deliveries WHERE state = 'pending'")
    )
    return int(found.scalar_one())
