"""The ledger schema: the mirrored orders, their history, the inbox and the sync bookkeeping.

Every row carries ``account_id`` (the PandaPon user-id) so several accounts can share one
database. Money is ``numeric`` in the order currency; every time is ``timestamptz``. Enumerated
values are stored as text by value with a CHECK constraint (cheap to extend in a migration,
unlike a Postgres ENUM type). The columns are documented for analysts in docs/reporting.md.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.domain import (
    FailureKind,
    InboxState,
    MessageKind,
    OrderStatus,
    PaymentState,
    Platform,
    RefundState,
    RefundStatus,
    SignatureState,
    SyncSource,
    UnmappedField,
)

__all__ = [  # the vocabulary, for callers that read it beside the tables
    "FailureKind",
    "InboxState",
    "MessageKind",
    "OrderStatus",
    "PaymentState",
    "Platform",
    "RefundState",
    "RefundStatus",
    "SignatureState",
    "SyncSource",
    "UnmappedField",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


MONEY = Numeric(18, 2)
TZ = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: TZ,
        Decimal: MONEY,
        dict[str, Any]: JSONB,
    }


class Order(Base):
    """Current state of one upstream order, as last read from the query APIs."""

    __tablename__ = "orders"
    __table_args__ = (
        UniqueConstraint("account_id", "platform", "order_id"),
        Index(
            "ix_orders_not_final_synced",
            "last_synced_at",
            postgresql_where=text(
                "status IN ('pending_payment', 'paid', 'shipped') OR refund_state = 'requested'"
            ),
        ),
        # For the report_* views (migration 0002): day ranges and recent-period filters.
        Index("ix_orders_upstream_created_at", "upstream_created_at"),
        Index("ix_orders_paid_at", "paid_at"),
        Index("ix_orders_cancelled_at", "cancelled_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    order_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[OrderStatus] = mapped_column(_enum(OrderStatus, "order_status"))
    raw_status: Mapped[str] = mapped_column(String(64))
    refund_state: Mapped[RefundState] = mapped_column(
        _enum(RefundState, "refund_state"), server_default=RefundState.NONE.value
    )
    currency: Mapped[str] = mapped_column(String(3), server_default="CNY")
    total_amount: Mapped[Decimal | None]
    product_amount: Mapped[Decimal | None]
    shipping_fee: Mapped[Decimal | None]
    discount_amount: Mapped[Decimal | None]
    refunded_amount: Mapped[Decimal] = mapped_column(MONEY, server_default="0")
    close_reason: Mapped[str | None] = mapped_column(Text)
    upstream_created_at: Mapped[datetime | None]
    upstream_modified_at: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]
    shipped_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    # Why a part of the last truth written was not trusted (an upstream time in the future);
    # NULL when it was sane. See service.pandapon.sanity.
    upstream_anomaly: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    snapshot_at: Mapped[datetime] = mapped_column(
        comment="When the snapshot now stored was fetched; older snapshots never overwrite it."
    )
    first_seen_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_synced_at: Mapped[datetime] = mapped_column(server_default=func.now())


class OrderLine(Base):
    """One line of an order (a Taobao sub-order, a 1688 product item)."""

    __tablename__ = "order_lines"
    __table_args__ = (UniqueConstraint("order_pk", "line_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    line_id: Mapped[str] = mapped_column(String(64))
    product_id: Mapped[str | None] = mapped_column(String(64))
    sku_id: Mapped[str | None] = mapped_column(String(64))
    title: Mapped[str | None] = mapped_column(Text)
    quantity: Mapped[int | None] = mapped_column(Integer)
    unit_price: Mapped[Decimal | None]
    amount: Mapped[Decimal | None]
    raw_status: Mapped[str | None] = mapped_column(String(64))
    raw: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class OrderStatusHistory(Base):
    """Append-only: one row per observed change of an order's status."""

    __tablename__ = "order_status_history"
    __table_args__ = (Index(None, "order_pk", "observed_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    from_status: Mapped[OrderStatus | None] = mapped_column(_enum(OrderStatus, "from_status"))
    to_status: Mapped[OrderStatus] = mapped_column(_enum(OrderStatus, "to_status"))
    from_raw_status: Mapped[str | None] = mapped_column(String(64))
    to_raw_status: Mapped[str] = mapped_column(String(64))
    upstream_modified_at: Mapped[datetime | None]
    observed_at: Mapped[datetime] = mapped_column(server_default=func.now())
    source: Mapped[SyncSource] = mapped_column(_enum(SyncSource, "sync_source"))
    inbox_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_inbox.id", ondelete="SET NULL"), index=True
    )


class OrderPriceChange(Base):
    """Append-only: one row per observed change of an order's amounts."""

    __tablename__ = "order_price_changes"
    __table_args__ = (
        Index(None, "order_pk", "observed_at"),
        Index("ix_order_price_changes_observed_at", "observed_at"),  # report_price_changes
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    currency: Mapped[str] = mapped_column(String(3))
    old_total_amount: Mapped[Decimal | None]
    new_total_amount: Mapped[Decimal | None]
    old_product_amount: Mapped[Decimal | None]
    new_product_amount: Mapped[Decimal | None]
    old_shipping_fee: Mapped[Decimal | None]
    new_shipping_fee: Mapped[Decimal | None]
    upstream_modified_at: Mapped[datetime | None]
    observed_at: Mapped[datetime] = mapped_column(server_default=func.now())
    source: Mapped[SyncSource] = mapped_column(_enum(SyncSource, "sync_source"))
    inbox_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_inbox.id", ondelete="SET NULL"), index=True
    )


class Shipment(Base):
    """One parcel of an order, identified by its tracking number."""

    __tablename__ = "shipments"
    __table_args__ = (UniqueConstraint("order_pk", "tracking_number"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    tracking_number: Mapped[str] = mapped_column(String(64))
    line_id: Mapped[str | None] = mapped_column(String(64))
    carrier: Mapped[str | None] = mapped_column(Text)
    carrier_code: Mapped[str | None] = mapped_column(String(64))
    raw_status: Mapped[str | None] = mapped_column(String(64))
    first_event_at: Mapped[datetime | None]
    last_event_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    raw: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    last_synced_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ShipmentEvent(Base):
    """One logistics trace event; ``event_key`` is a digest of its time, status and text."""

    __tablename__ = "shipment_events"
    __table_args__ = (UniqueConstraint("shipment_id", "event_key"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    shipment_id: Mapped[int] = mapped_column(ForeignKey("shipments.id", ondelete="CASCADE"))
    event_key: Mapped[str] = mapped_column(String(64))
    event_at: Mapped[datetime | None]
    status: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    location: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    observed_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Refund(Base):
    """One after-sales (refund) record."""

    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("account_id", "platform", "refund_id"),
        # For report_refunds and report_daily_sales (migration 0002).
        Index("ix_refunds_requested_at", "requested_at"),
        Index("ix_refunds_resolved_at", "resolved_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    refund_id: Mapped[str] = mapped_column(String(64))
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), index=True)
    line_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[RefundStatus] = mapped_column(_enum(RefundStatus, "refund_status"))
    raw_status: Mapped[str] = mapped_column(String(64))
    currency: Mapped[str] = mapped_column(String(3), server_default="CNY")
    amount: Mapped[Decimal | None]
    reason: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    upstream_modified_at: Mapped[datetime | None]
    raw: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    last_synced_at: Mapped[datetime] = mapped_column(server_default=func.now())


class WebhookInbox(Base):
    """Every accepted message, byte-exact, with its processing state."""

    __tablename__ = "webhook_inbox"
    __table_args__ = (
        UniqueConstraint("dedupe_key"),
        Index(
            "ix_webhook_inbox_unqueued", "received_at", postgresql_where=text("state = 'received'")
        ),
        Index(
            "ix_webhook_inbox_handed_off", "queued_at", postgresql_where=text("state = 'queued'")
        ),
        Index(
            "ix_webhook_inbox_open_by_order",
            "account_id",
            "platform",
            "order_id",
            postgresql_where=text("state IN ('received', 'queued')"),
        ),
        # An order's story (``pandasync order``): every message of it, whatever its state.
        Index("ix_webhook_inbox_order", "account_id", "platform", "order_id"),
        # The console's charts of the last hours (migration 0011): appended in time order.
        Index("ix_webhook_inbox_received_at", "received_at", postgresql_using="brin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    dedupe_key: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    message_type: Mapped[str] = mapped_column(String(128))
    kind: Mapped[MessageKind] = mapped_column(_enum(MessageKind, "message_kind"))
    platform: Mapped[Platform | None] = mapped_column(_enum(Platform, "platform"))
    order_id: Mapped[str | None] = mapped_column(String(64))
    refund_id: Mapped[str | None] = mapped_column(String(64))
    pushed_at: Mapped[datetime | None] = mapped_column(comment="The envelope's push timestamp.")
    raw_body: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, Any]] = mapped_column(comment="Request headers minus the signature.")
    request_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[InboxState] = mapped_column(
        _enum(InboxState, "inbox_state"), server_default=InboxState.RECEIVED.value
    )
    queued_at: Mapped[datetime | None]
    processed_at: Mapped[datetime | None]
    signature_state: Mapped[SignatureState | None] = mapped_column(
        _enum(SignatureState, "signature_state"),
        comment="What the signature headers showed; NULL: not checked (token mode, no secret).",
    )


class WebhookNonce(Base):
    """Signature nonces seen inside the tolerance window, shared by every web process.

    The callback signature does not cover the body, so a nonce seen twice is a replay. Rows
    older than the tolerance window are useless and may be deleted.
    """

    __tablename__ = "webhook_nonces"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class SyncFailure(Base):
    """An order that could not be synced; open while ``resolved_at`` is null."""

    __tablename__ = "sync_failures"
    __table_args__ = (
        Index(
            "uq_sync_failures_open_order",
            "account_id",
            "platform",
            "order_id",
            unique=True,
            postgresql_where=text("resolved_at IS NULL"),
        ),
        Index("ix_sync_failures_order", "account_id", "platform", "order_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    order_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[FailureKind] = mapped_column(_enum(FailureKind, "failure_kind"))
    source: Mapped[SyncSource] = mapped_column(_enum(SyncSource, "sync_source"))
    error: Mapped[str] = mapped_column(Text)
    endpoint: Mapped[str | None] = mapped_column(String(64))
    http_status: Mapped[int | None] = mapped_column(Integer)
    upstream_code: Mapped[str | None] = mapped_column(String(32))
    upstream_msg: Mapped[str | None] = mapped_column(Text)
    upstream_request_id: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, server_default="1")
    first_failed_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_failed_at: Mapped[datetime] = mapped_column(server_default=func.now())
    replayed_at: Mapped[datetime | None]
    replay_count: Mapped[int] = mapped_column(Integer, server_default="0")
    resolved_at: Mapped[datetime | None]
    # Closed by a person (``pandasync dismiss``) rather than by a reconcile that succeeded:
    # when, who (the operator's name as given, or the OS user) and why.
    dismissed_at: Mapped[datetime | None]
    dismissed_by: Mapped[str | None] = mapped_column(String(128))
    dismissed_reason: Mapped[str | None] = mapped_column(Text)


class PaymentAttempt(Base):
    """One attempt to pay one order, recorded before the upstream call and again after it.

    At most one attempt per order may be in flight (``started``) or unresolved (``unknown``):
    the partial unique index makes a second one impossible, whichever process asks.
    """

    __tablename__ = "payment_attempts"
    __table_args__ = (
        Index(
            "uq_payment_attempts_in_flight",
            "account_id",
            "platform",
            "order_id",
            unique=True,
            postgresql_where=text("state IN ('started', 'unknown')"),
        ),
        Index("ix_payment_attempts_order", "account_id", "platform", "order_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    order_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(36), comment="The `pandasync pay` run that made it.")
    requested_by: Mapped[str] = mapped_column(String(128))
    state: Mapped[PaymentState] = mapped_column(
        _enum(PaymentState, "payment_state"), server_default=PaymentState.STARTED.value
    )
    amount: Mapped[Decimal | None] = mapped_column(
        MONEY, comment="The order total the upstream re-fetch showed just before the call."
    )
    currency: Mapped[str] = mapped_column(String(3), server_default="CNY")
    pay_url: Mapped[str | None] = mapped_column(Text)
    upstream_code: Mapped[str | None] = mapped_column(String(32))
    upstream_msg: Mapped[str | None] = mapped_column(Text)
    upstream_request_id: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None]


class _SweepCursorColumns:
    """Where the sweep of a list of one account and platform has reached (one row each)."""

    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"), primary_key=True)
    cursor_at: Mapped[datetime | None] = mapped_column(
        comment="Upstream modification time up to which every page has been processed."
    )
    last_started_at: Mapped[datetime | None]
    last_finished_at: Mapped[datetime | None]
    last_examined: Mapped[int] = mapped_column(Integer, server_default="0")


class SweepCursor(_SweepCursorColumns, Base):
    """Where the sweep of one account and platform has reached, and what it last found."""

    __tablename__ = "sweep_cursors"

    last_drift: Mapped[int] = mapped_column(
        Integer, server_default="0", comment="Orders the last sweep found out of date."
    )


class RefundSweepCursor(_SweepCursorColumns, Base):
    """Where the sweep of one account and platform's after-sales list has reached."""

    __tablename__ = "refund_sweep_cursors"

    last_drift: Mapped[int] = mapped_column(
        Integer, server_default="0", comment="Refunds the last sweep found missing or out of date."
    )


class UnmappedValue(Base):
    """An upstream value the mapping could not place (status, refund status, parcel status,
    message type): when it was first and last seen, how often, and on which order last."""

    __tablename__ = "unmapped_values"
    __table_args__ = (
        UniqueConstraint(
            "account_id", "platform", "field", "value", postgresql_nulls_not_distinct=True
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform | None] = mapped_column(_enum(Platform, "platform"))
    field: Mapped[UnmappedField] = mapped_column(_enum(UnmappedField, "unmapped_field"))
    value: Mapped[str] = mapped_column(String(128))
    first_seen_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(server_default=func.now())
    seen_count: Mapped[int] = mapped_column(
        BigInteger, server_default="1", comment="Snapshots (or messages) that carried it."
    )
    last_order_id: Mapped[str | None] = mapped_column(String(64))


class BackfillRun(Base):
    """A resumable backfill: the page it reached and its counters."""

    __tablename__ = "backfill_runs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    since: Mapped[datetime]
    until: Mapped[datetime]
    next_page: Mapped[int] = mapped_column(Integer, server_default="1")
    orders_seen: Mapped[int] = mapped_column(Integer, server_default="0")
    orders_queued: Mapped[int] = mapped_column(Integer, server_default="0")
    started_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None]


class JobRun(Base):
    """Scheduler bookkeeping: a periodic job runs once per interval across all instances."""

    __tablename__ = "job_runs"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_started_at: Mapped[datetime | None]
    last_finished_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class RateLimitBucket(Base):
    """The upstream rate limit's token bucket of one account when no Redis holds it (a RabbitMQ
    broker): ``service.pandapon.ratelimit.PostgresTokenBucket``. Times are epoch seconds of the
    database clock."""

    __tablename__ = "rate_limit_buckets"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    tokens: Mapped[float] = mapped_column(Double)
    stamp: Mapped[float] = mapped_column(Double)
    blocked_until: Mapped[float] = mapped_column(Double, server_default="0")


# --- the change feed and outbound webhooks (migration 0010) --------------------------------------


class ChangeKind(enum.StrEnum):
    """What a ``ledger_changes`` row says happened; also the outbound event ``type``."""

    STATUS_CHANGED = "order.status_changed"
    PRICE_CHANGED = "order.price_changed"
    SHIPPED = "order.shipped"
    DELIVERED = "order.delivered"
    REFUND_CHANGED = "order.refund_changed"
    PAYMENT_OUTCOME = "payment.outcome"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # due at next_attempt_at (also while an attempt is in flight: a lease)
    DELIVERED = "delivered"  # a 2xx answered
    FAILED = "failed"  # the retry schedule ran out; replay sends it again


class LedgerChange(Base):
    """Append-only: one row per real change of an order, written in the ledger write's own
    transaction. ``tx_id`` (the writing transaction's id) lets a consumer tell settled rows
    from rows a still running transaction may yet add below them (docs/reporting.md)."""

    __tablename__ = "ledger_changes"
    __table_args__ = (
        Index(None, "tx_id"),
        Index(None, "account_id", "platform", "order_id", "id"),
        Index("ix_ledger_changes_recorded_at", "recorded_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    order_id: Mapped[str] = mapped_column(String(64))
    order_pk: Mapped[int | None] = mapped_column(ForeignKey("orders.id", ondelete="SET NULL"))
    kind: Mapped[ChangeKind] = mapped_column(_enum(ChangeKind, "change_kind"))
    payload: Mapped[dict[str, Any]]
    occurred_at: Mapped[datetime | None] = mapped_column(
        comment="When upstream says it happened (its modification time), if it says."
    )
    recorded_at: Mapped[datetime] = mapped_column(server_default=func.now())
    tx_id: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("(pg_current_xact_id())::text::bigint"),
        comment="The writing transaction's id (xid8 as bigint).",
    )


class OutboundEndpoint(Base):
    """A receiver of signed outbound webhooks, configured by the operator."""

    __tablename__ = "outbound_endpoints"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str] | None] = mapped_column(
        ARRAY(Text), comment="Change kinds sent; NULL: all."
    )
    account_ids: Mapped[list[str] | None] = mapped_column(
        ARRAY(Text), comment="Accounts whose changes are sent; NULL: all."
    )
    secret: Mapped[str] = mapped_column(Text, comment="whsec_… signing secret.")
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    feed_horizon: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("(pg_snapshot_xmin(pg_current_snapshot()))::text::bigint"),
        comment="Changes with a smaller tx_id have been fanned out to this endpoint.",
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class OutboundDelivery(Base):
    """One change to one endpoint: its state and its latest attempt."""

    __tablename__ = "outbound_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "change_id"),
        Index(
            "ix_outbound_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
        Index(None, "endpoint_id", "account_id", "platform", "order_id", "change_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(
        ForeignKey("outbound_endpoints.id", ondelete="CASCADE")
    )
    change_id: Mapped[int] = mapped_column(ForeignKey("ledger_changes.id", ondelete="CASCADE"))
    account_id: Mapped[str] = mapped_column(String(64))
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    order_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), server_default=DeliveryState.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_latency_ms: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class OutboundDeliveryAttempt(Base):
    """Append-only: every attempt of a delivery, as it ended."""

    __tablename__ = "outbound_delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("outbound_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(server_default=func.now())
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
