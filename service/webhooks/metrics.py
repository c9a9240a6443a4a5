"""Prometheus metrics of the receiver and the relay (default registry, served at /metrics).

With ``pandasync serve --workers N`` the processes share a ``PROMETHEUS_MULTIPROC_DIR`` (set by
the command when the environment does not), so one scrape of /metrics sums them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import Counter as CounterChild

from service.domain import MessageKind, SignatureState
from service.webhooks.reasons import REASON_NAMES

# Every reason a request can be refused with (reasons.py); the ``reason`` label, so it stays small.
REJECT_REASONS = REASON_NAMES

RECEIVED = Counter(
    "pandasync_webhook_received_total", "Webhook requests received (every POST, before any check)."
)
ACCEPTED = Counter(
    "pandasync_webhook_accepted_total",
    "Messages newly committed to webhook_inbox, by account and kind.",
    ["account", "kind"],
)
DUPLICATES = Counter(
    "pandasync_webhook_duplicates_total",
    "Messages answered 200 because an identical message was already in the inbox, by account.",
    ["account"],
)
PROBES = Counter(
    "pandasync_webhook_probes_total",
    "Probes (empty body or no messageType) answered 200 without storing anything.",
)
UNKNOWN_TYPES = Counter(
    "pandasync_webhook_unknown_type_total",
    "Stored messages whose messageType is not one pandasync knows, by account.",
    ["account"],
)
SIGNATURES = Counter(
    "pandasync_webhook_signature_total",
    "Accepted callbacks (stored or duplicate) by account and what their signature headers "
    "showed: valid, absent, stale or mismatch. Under WEBHOOK_AUTH=auto the token URL accepts "
    "all four.",
    ["account", "state"],
)
REJECTED = Counter(
    "pandasync_webhook_rejected_total",
    "Requests not answered 200, by reason (4xx and 503).",
    ["reason"],
)
STORE_SECONDS = Histogram(
    "pandasync_webhook_store_seconds",
    "Time from handing a message to the inbox writer to its commit.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
BATCH_SIZE = Histogram(
    "pandasync_webhook_store_batch_size",
    "Messages committed together by the inbox writer in one transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
HANDOFF = Counter(
    "pandasync_webhook_handoff_total",
    "Reconcile messages sent to the broker right after commit, by result.",
    ["result"],
)
RELAY_HANDED_OFF = Counter(
    "pandasync_relay_handed_off_total",
    "Inbox rows the relay found not handed off and sent to the broker.",
)
RELAY_HANDED_OFF_AGAIN = Counter(
    "pandasync_relay_handed_off_again_total",
    "Inbox rows handed off once, never processed, and sent again: the broker lost them.",
)
RELAY_FAILURES = Counter(
    "pandasync_relay_failures_total", "Relay passes that stopped on a broker or database error."
)
RELAY_BACKLOG = Gauge(
    "pandasync_relay_backlog",
    "Inbox rows committed but not yet handed to the broker (state 'received').",
    multiprocess_mode="mostrecent",  # every web process measures the same inbox
)
RELAY_OLDEST_SECONDS = Gauge(
    "pandasync_relay_oldest_seconds",
    "Age of the oldest inbox row not yet handed to the broker (0 when none).",
    multiprocess_mode="mostrecent",  # every web process measures the same inbox
)
NONCES_PURGED = Counter(
    "pandasync_relay_nonces_purged_total", "Signature nonces deleted after leaving the window."
)

# Pre-bound children: the hot path should not look labels up on every request.
REJECTED_BY_REASON = {reason: REJECTED.labels(reason=reason) for reason in REJECT_REASONS}
HANDOFF_SENT = HANDOFF.labels(result="sent")
HANDOFF_FAILED = HANDOFF.labels(result="failed")
HANDOFF_DEFERRED = HANDOFF.labels(result="deferred")


@dataclass(frozen=True, slots=True)
class AccountCounters:
    """The children of one account's counters, bound once (an account is known only once a
    callback is verified, so they are made on its first)."""

    accepted: dict[MessageKind, CounterChild]
    duplicates: CounterChild
    unknown_types: CounterChild
    signatures: dict[SignatureState, CounterChild]


_BY_ACCOUNT: dict[str, AccountCounters] = {}


def for_account(account_id: str) -> AccountCounters:
    counters = _BY_ACCOUNT.get(account_id)
    if counters is None:
        counters = _BY_ACCOUNT[account_id] = AccountCounters(
            accepted={k: ACCEPTED.labels(account=account_id, kind=k.value) for k in MessageKind},
            duplicates=DUPLICATES.labels(account=account_id),
            unknown_types=UNKNOWN_TYPES.labels(account=account_id),
            signatures={
                s: SIGNATURES.labels(account=account_id, state=s.value) for s in SignatureState
            },
        )
    return counters


def rejected(reason: str) -> None:
    child = REJECTED_BY_REASON.get(reason)
    (child or REJECTED.labels(reason="internal_error")).inc()
