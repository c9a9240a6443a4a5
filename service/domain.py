"""The domain vocabulary: the values every part of pandasync speaks of.

Platforms, statuses, sources, the inbox's states. The PandaPon client, the ledger, the sandbox,
the web role and the workers all import this module; it imports none of them (see
docs/architecture.md). The ledger stores each as text by value with a CHECK constraint.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Platform(enum.StrEnum):
    TAOBAO = "taobao"
    ALIBABA_1688 = "1688"


class OrderStatus(enum.StrEnum):
    """The normalized order status, the same for both platforms (docs/upstream.md#statuses)."""

    PENDING_PAYMENT = "pending_payment"
    PAID = "paid"
    SHIPPED = "shipped"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


class RefundState(enum.StrEnum):
    """The order's refund summary, derived from its refunds."""

    NONE = "none"
    REQUESTED = "requested"
    REFUNDED = "refunded"
    REJECTED = "rejected"


class RefundStatus(enum.StrEnum):
    """The normalized status of one after-sales record."""

    REQUESTED = "requested"
    REFUNDED = "refunded"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


class SyncSource(enum.StrEnum):
    """What made pandasync look at an order."""

    WEBHOOK = "webhook"
    SWEEP = "sweep"
    REFRESH = "refresh"
    BACKFILL = "backfill"
    MANUAL = "manual"
    REPLAY = "replay"
    REMAP = "remap"  # re-derived from stored payloads after a mapping change, no upstream call


class MessageKind(enum.StrEnum):
    PRICE = "price"
    STATUS = "status"
    REFUND = "refund"
    OTHER = "other"


class InboxState(enum.StrEnum):
    """received: committed, not yet handed to the broker; queued: handed off;
    processed: a reconcile that started after it finished; ignored: nothing to reconcile, or set
    aside when a person dismissed the order's failure (``pandasync dismiss``)."""

    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSED = "processed"
    IGNORED = "ignored"


class SignatureState(enum.StrEnum):
    """What the signature headers of an accepted callback showed (``webhook_inbox``).

    valid: signed as PandaPon signs requests (docs/upstream.md#requests-host-and-signing), in
    time; absent: no ``signature`` header; stale: signed right, but the timestamp is outside
    the tolerance; mismatch: signed, but not as we sign (another secret, algorithm, access key
    or unit).
    """

    VALID = "valid"
    ABSENT = "absent"
    STALE = "stale"
    MISMATCH = "mismatch"


class FailureKind(enum.StrEnum):
    PERMANENT = "permanent"
    EXHAUSTED = "exhausted"


class PaymentState(enum.StrEnum):
    """Where one payment attempt stands (``payment_attempts``).

    started: recorded before the upstream call, outcome not yet known; paid: upstream paid it
    (1688 protocol pay, or Taobao's pay call); pay_by_hand: upstream answered a ``pay_url`` for a
    person; held_back: upstream refused it for now (quota, risk control); failed: upstream
    answered an error; unknown: the call's outcome cannot be known (timeout, crash) and a
    person must look before the order is paid again.
    """

    STARTED = "started"
    PAID = "paid"
    PAY_BY_HAND = "pay_by_hand"
    HELD_BACK = "held_back"
    FAILED = "failed"
    UNKNOWN = "unknown"


# An attempt in one of these states blocks another attempt for the same order.
PAYMENT_IN_FLIGHT_STATES = (PaymentState.STARTED, PaymentState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class ReconcileRequest:
    """One reconcile asked for: which order, why, and what named it (an inbox row, a refund)."""

    account_id: str
    platform: Platform
    order_id: str
    source: SyncSource
    inbox_id: int | None = None
    refund_id: str | None = None


# The inbox states of a message whose reconcile has not yet covered it.
WAITING_INBOX_STATES = (InboxState.RECEIVED, InboxState.QUEUED)


class UnmappedField(enum.StrEnum):
    """Which kind of upstream value the mapping could not place."""

    ORDER_STATUS = "order_status"
    REFUND_STATUS = "refund_status"
    PARCEL_STATUS = "parcel_status"
    MESSAGE_TYPE = "message_type"
