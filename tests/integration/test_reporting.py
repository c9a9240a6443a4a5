"""The report_* views on a small ledger whose every figure is known (docs/reporting.md).

Times are UTC; the reporting zone is Asia/Shanghai (UTC+8) unless a test sets another, so an
order paid at 16:10 UTC on 1 November counts on 2 November.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


def t(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


async def _insert(session: AsyncSession, table: str, **values: Any) -> int:
    columns = ", ".join(values)
    params = ", ".join(f":{k}" for k in values)
    result = await session.execute(
        text(f"INSERT INTO {table} ({columns}) VALUES ({params}) RETURNING id"), values
    )
    return int(result.scalar_one())


async def _order(
    session: AsyncSession,
    order_id: str,
    status: str,
    total: str,
    *,
    account: str = "acct",
    platform: str = "taobao",
    **times: datetime,
) -> int:
    return await _insert(
        session,
        "orders",
        account_id=account,
        platform=platform,
        order_id=order_id,
        status=status,
        raw_status=status.upper(),
        total_amount=Decimal(total),
        snapshot_at=t(6, 0),
        **times,
    )


async def _refund(
    session: AsyncSession, order_pk: int, refund_id: str, status: str, amount: str, **kw: Any
) -> int:
    return await _insert(
        session,
        "refunds",
        account_id=kw.pop("account", "acct"),
        platform=kw.pop("platform", "taobao"),
        refund_id=refund_id,
        order_pk=order_pk,
        status=status,
        raw_status=status.upper(),
        amount=Decimal(amount),
        **kw,
    )


async def _inbox(
    session: AsyncSession, key: str, state: str, received_at: datetime, **kw: Any
) -> None:
    await session.execute(
        text(
            "INSERT INTO webhook_inbox (account_id, dedupe_key, received_at, message_type, kind, "
            "platform, raw_body, headers, state) VALUES ('acct', :key, :received_at, 'X', "
            ":kind, :platform, :body, CAST('{}' AS jsonb), :state)"
        ),
        {
            "key": key,
            "received_at": received_at,
            "kind": kw.get("kind", "status"),
            "platform": kw.get("platform", "taobao"),
            "body": b"{}",
            "state": state,
        },
    )


async def known_ledger(session: AsyncSession) -> dict[str, int]:
    """Six orders, four refunds, three parcels, one price change, some inbox and failures."""
    o1 = await _order(
        session, "O1", "completed", "100.00",
        upstream_created_at=t(1, 15, 30), paid_at=t(1, 16, 10), shipped_at=t(2, 4),
        delivered_at=t(4, 4), completed_at=t(5, 0),
    )  # fmt: skip
    o2 = await _order(
        session, "O2", "paid", "50.50", upstream_created_at=t(2, 1), paid_at=t(2, 1, 5)
    )
    o3 = await _order(
        session, "O3", "cancelled", "200.00", platform="1688",
        upstream_created_at=t(2, 2), cancelled_at=t(2, 3),
    )  # fmt: skip
    o4 = await _order(
        session, "O4", "cancelled", "80.00", platform="1688",
        upstream_created_at=t(2, 2, 30), paid_at=t(2, 2, 40), cancelled_at=t(2, 17),
    )  # fmt: skip
    o5 = await _order(
        session, "O5", "shipped", "10.00", account="acct-b",
        upstream_created_at=t(2, 10), paid_at=t(2, 10, 1),
    )  # fmt: skip
    o6 = await _order(session, "O6", "pending_payment", "5.00", upstream_created_at=t(2, 12))
    await session.execute(
        text("UPDATE orders SET refund_state = 'refunded' WHERE id = :pk"), {"pk": o4}
    )

    # O1: one parcel; O5: two parcels with different carriers, one still in transit and no
    # shipped time on the order itself (the trace fills it in).
    for order_pk, tracking, carrier, code, first_event_at, delivered_at in [
        (o1, "ZTO1", "中通快递", "ZTO", t(2, 5), t(4, 4)),
        (o5, "YT5", "圆通速递", "YTO", t(3, 0), t(4, 0)),
        (o5, "YD5", "韵达快递", "YUNDA", t(2, 23), None),
    ]:
        await _insert(
            session, "shipments", account_id="acct-b" if order_pk == o5 else "acct",
            order_pk=order_pk, tracking_number=tracking, carrier=carrier, carrier_code=code,
            first_event_at=first_event_at, delivered_at=delivered_at,
        )  # fmt: skip

    # History and trace rows feed no view; they are here for the access tests.
    await _insert(
        session, "order_status_history", account_id="acct", order_pk=o1,
        from_status="paid", to_status="shipped", to_raw_status="SHIPPED", source="webhook",
    )  # fmt: skip
    await session.execute(
        text(
            "INSERT INTO shipment_events (account_id, shipment_id, event_key, event_at, status) "
            "SELECT 'acct', id, 'k1', first_event_at, 'ACCEPT' FROM shipments "
            "WHERE tracking_number = 'ZTO1'"
        )
    )

    await _refund(session, o1, "R1", "refunded", "30.00", line_id="1",
                  requested_at=t(5, 2), resolved_at=t(5, 14))  # fmt: skip
    await _refund(session, o2, "R2", "requested", "50.50", requested_at=t(2, 3))
    await _refund(session, o4, "R3", "refunded", "80.00", platform="1688",
                  requested_at=t(2, 5), resolved_at=t(2, 17))  # fmt: skip
    await _refund(session, o1, "R4", "rejected", "10.00",
                  requested_at=t(4, 1), resolved_at=t(4, 3))  # fmt: skip

    for order_pk, line_id, product, quantity, unit, amount in [
        (o1, "1", "P1", 2, "30.00", "60.00"),
        (o1, "2", "P2", 1, "40.00", "40.00"),
        (o2, "1", "P1", 1, "30.00", "30.00"),
        (o2, "2", "P3", 1, "20.50", "20.50"),
        (o3, "1", "P1", 5, "40.00", "200.00"),
        (o5, "1", "P2", 1, "10.00", "10.00"),
    ]:
        await _insert(
            session, "order_lines", account_id="acct-b" if order_pk == o5 else "acct",
            order_pk=order_pk, line_id=line_id, product_id=product, title=f"title {product}",
            quantity=quantity, unit_price=Decimal(unit), amount=Decimal(amount),
        )  # fmt: skip

    await _insert(
        session, "order_price_changes", account_id="acct", order_pk=o2, currency="CNY",
        old_total_amount=Decimal("60.50"), new_total_amount=Decimal("50.50"),
        observed_at=t(2, 1, 3), source="webhook",
    )  # fmt: skip

    await _inbox(session, "m1", "received", t(6, 0))
    await _inbox(session, "m2", "queued", t(6, 0, 2))
    await _inbox(session, "m3", "received", t(6, 0, 5))
    await _inbox(session, "m4", "processed", t(1, 0))
    await _inbox(session, "m5", "processed", t(5, 0), platform="1688")
    await _inbox(session, "m6", "received", t(6, 1), platform=None, kind="other")
    failure = {"account_id": "acct", "kind": "permanent", "source": "webhook", "error": "x"}
    await _insert(session, "sync_failures", platform="1688", order_id="O3",
                  first_failed_at=t(5, 0), **failure)  # fmt: skip
    await _insert(session, "sync_failures", platform="1688", order_id="O9",
                  first_failed_at=t(5, 6), **failure)  # fmt: skip
    await _insert(session, "sync_failures", platform="taobao", order_id="O1",
                  first_failed_at=t(3, 0), resolved_at=t(3, 1), **failure)  # fmt: skip
    await session.execute(
        text(
            "INSERT INTO sweep_cursors (account_id, platform, cursor_at, last_started_at, "
            "last_finished_at, last_examined, last_drift) VALUES "
            "('acct', 'taobao', :c, :s, :f, 120, 3), ('acct', '1688', :c, :s, :f, 40, 0)"
        ),
        {"c": t(5, 23), "s": t(5, 23, 45), "f": t(6, 0)},
    )
    await session.execute(
        text(
            "INSERT INTO refund_sweep_cursors (account_id, platform, cursor_at, last_started_at, "
            "last_finished_at, last_examined, last_drift) "
            "VALUES ('acct', 'taobao', :c, :s, :f, 7, 1)"
        ),
        {"c": t(5, 22), "s": t(5, 23, 50), "f": t(5, 23, 55)},
    )
    # Values the mapping could not place: a parcel status O1's parcel still holds, and a refund
    # status no refund holds any more.
    await session.execute(
        text("UPDATE shipments SET raw_status = 'LOST_IN_SPACE' WHERE tracking_number = 'ZTO1'")
    )
    await _insert(session, "unmapped_values", account_id="acct", platform="taobao",
                  field="parcel_status", value="LOST_IN_SPACE", first_seen_at=t(2, 5),
                  last_seen_at=t(4, 4), seen_count=3, last_order_id="O1")  # fmt: skip
    await _insert(session, "unmapped_values", account_id="acct", platform="1688",
                  field="refund_status", value="weird", first_seen_at=t(2, 5),
                  last_seen_at=t(2, 6), seen_count=1, last_order_id="O4")  # fmt: skip
    return {"o1": o1, "o2": o2, "o3": o3, "o4": o4, "o5": o5, "o6": o6}


async def _rows(session: AsyncSession, query: str, **params: Any) -> list[dict[str, Any]]:
    result = await session.execute(text(query), params)
    return [dict(row) for row in result.mappings().all()]


def _pick(rows: list[dict[str, Any]], *columns: str) -> list[tuple[Any, ...]]:
    return [tuple(row[c] for c in columns) for row in rows]


D = Decimal
SALES_COLUMNS = (
    "day", "account_id", "platform", "orders_created", "orders_paid", "orders_cancelled",
    "gross_amount", "refunds", "refunded_amount", "net_amount",
)  # fmt: skip


async def test_daily_sales_counts_each_event_on_its_local_day(db_session: AsyncSession) -> None:
    await known_ledger(db_session)
    rows = await _rows(
        db_session, "SELECT * FROM report_daily_sales ORDER BY day, account_id, platform"
    )
    assert _pick(rows, *SALES_COLUMNS) == [
        (date(2026, 11, 1), "acct", "taobao", 1, 0, 0, D("0.00"), 0, D("0.00"), D("0.00")),
        (date(2026, 11, 2), "acct", "1688", 2, 1, 1, D("80.00"), 0, D("0.00"), D("80.00")),
        (date(2026, 11, 2), "acct", "taobao", 2, 2, 0, D("150.50"), 0, D("0.00"), D("150.50")),
        (date(2026, 11, 2), "acct-b", "taobao", 1, 1, 0, D("10.00"), 0, D("0.00"), D("10.00")),
        (date(2026, 11, 3), "acct", "1688", 0, 0, 1, D("0.00"), 1, D("80.00"), D("-80.00")),
        (date(2026, 11, 5), "acct", "taobao", 0, 0, 0, D("0.00"), 1, D("30.00"), D("-30.00")),
    ]
    assert {r["currency"] for r in rows} == {"CNY"}
    first = rows[0]
    assert first["day_start"] == datetime(2026, 10, 31, 16, tzinfo=UTC)
    assert first["day_end"] == datetime(2026, 11, 1, 16, tzinfo=UTC)


async def test_daily_sales_filters_by_day_and_by_day_start(db_session: AsyncSession) -> None:
    await known_ledger(db_session)
    by_day = await _rows(
        db_session,
        "SELECT day, platform, net_amount FROM report_daily_sales WHERE day >= :d "
        "ORDER BY day, platform",
        d=date(2026, 11, 3),
    )
    assert _pick(by_day, "day", "platform", "net_amount") == [
        (date(2026, 11, 3), "1688", D("-80.00")),
        (date(2026, 11, 5), "taobao", D("-30.00")),
    ]
    by_start = await _rows(
        db_session,
        "SELECT day FROM report_daily_sales WHERE day_start >= :s AND day_start < :e",
        s=t(1, 16),
        e=t(2, 16),
    )
    assert {r["day"] for r in by_start} == {date(2026, 11, 2)}


async def test_the_reporting_zone_comes_from_the_database_setting(
    db_session: AsyncSession,
) -> None:
    await known_ledger(db_session)
    assert await db_session.scalar(text("SELECT report_timezone()")) == "Asia/Shanghai"
    await db_session.execute(text("SET LOCAL pandasync.reporting_tz = 'UTC'"))
    assert await db_session.scalar(text("SELECT report_timezone()")) == "UTC"
    rows = await _rows(
        db_session, "SELECT * FROM report_daily_sales ORDER BY day, account_id, platform"
    )
    # In UTC, O1 is paid on 1 November and O4's refund lands on 2 November.
    assert _pick(rows, *SALES_COLUMNS) == [
        (date(2026, 11, 1), "acct", "taobao", 1, 1, 0, D("100.00"), 0, D("0.00"), D("100.00")),
        (date(2026, 11, 2), "acct", "1688", 2, 1, 2, D("80.00"), 1, D("80.00"), D("0.00")),
        (date(2026, 11, 2), "acct", "taobao", 2, 1, 0, D("50.50"), 0, D("0.00"), D("50.50")),
        (date(2026, 11, 2), "acct-b", "taobao", 1, 1, 0, D("10.00"), 0, D("0.00"), D("10.00")),
        (date(2026, 11, 5), "acct", "taobao", 0, 0, 0, D("0.00"), 1, D("30.00"), D("-30.00")),
    ]
    assert rows[0]["day_start"] == datetime(2026, 11, 1, tzinfo=UTC)


async def test_refunds_with_their_order_and_time_to_resolve(db_session: AsyncSession) -> None:
    pks = await known_ledger(db_session)
    rows = await _rows(db_session, "SELECT * FROM report_refunds ORDER BY refund_id")
    assert _pick(
        rows, "refund_id", "order_id", "platform", "status", "amount", "requested_day",
        "resolved_day", "time_to_resolve", "order_status", "order_total_amount",
    ) == [
        ("R1", "O1", "taobao", "refunded", D("30.00"), date(2026, 11, 5), date(2026, 11, 5),
         timedelta(hours=12), "completed", D("100.00")),
        ("R2", "O2", "taobao", "requested", D("50.50"), date(2026, 11, 2), None, None, "paid",
         D("50.50")),
        ("R3", "O4", "1688", "refunded", D("80.00"), date(2026, 11, 2), date(2026, 11, 3),
         timedelta(hours=12), "cancelled", D("80.00")),
        ("R4", "O1", "taobao", "rejected", D("10.00"), date(2026, 11, 4), date(2026, 11, 4),
         timedelta(hours=2), "completed", D("100.00")),
    ]  # fmt: skip
    assert rows[0]["order_pk"] == pks["o1"]
    assert rows[0]["line_id"] == "1"
    assert rows[2]["order_refund_state"] == "refunded"
    assert rows[2]["order_paid_at"] == t(2, 2, 40)


async def test_fulfilment_durations_and_carriers(db_session: AsyncSession) -> None:
    await known_ledger(db_session)
    rows = await _rows(db_session, "SELECT * FROM report_fulfilment ORDER BY order_id")
    # O3 and O6 were never paid: not in the view.
    assert _pick(
        rows, "order_id", "status", "paid_day", "shipments", "carrier", "carrier_code",
        "tracking_number", "shipped_at", "delivered_at", "time_to_ship", "time_in_transit",
        "time_to_deliver",
    ) == [
        ("O1", "completed", date(2026, 11, 2), 1, "中通快递", "ZTO", "ZTO1", t(2, 4), t(4, 4),
         timedelta(hours=11, minutes=50), timedelta(days=2),
         timedelta(days=2, hours=11, minutes=50)),
        ("O2", "paid", date(2026, 11, 2), 0, None, None, None, None, None, None, None, None),
        ("O4", "cancelled", date(2026, 11, 2), 0, None, None, None, None, None, None, None, None),
        # Shipped at its first parcel's first scan; not delivered while a parcel travels.
        ("O5", "shipped", date(2026, 11, 2), 2, "multiple", "multiple", None, t(2, 23), None,
         timedelta(hours=12, minutes=59), None, None),
    ]  # fmt: skip
    assert rows[0]["completed_at"] == t(5, 0)
    assert rows[3]["account_id"] == "acct-b"


async def test_fulfilment_falls_back_to_the_trace_when_every_parcel_is_delivered(
    db_session: AsyncSession,
) -> None:
    pks = await known_ledger(db_session)
    await db_session.execute(
        text("UPDATE shipments SET delivered_at = :d WHERE tracking_number = 'YD5'"),
        {"d": t(4, 6)},
    )
    row = (
        await _rows(
            db_session, "SELECT * FROM report_fulfilment WHERE order_pk = :pk", pk=pks["o5"]
        )
    )[0]
    assert row["delivered_at"] == t(4, 6)
    assert row["time_in_transit"] == timedelta(days=1, hours=7)


async def test_sync_health_per_account_and_platform(db_session: AsyncSession) -> None:
    await known_ledger(db_session)
    now = await db_session.scalar(text("SELECT now()"))
    rows = await _rows(
        db_session,
        "SELECT * FROM report_sync_health ORDER BY account_id, platform NULLS LAST",
    )
    assert _pick(
        rows, "account_id", "platform", "inbox_unqueued", "inbox_backlog",
        "oldest_unprocessed_at", "open_failures", "oldest_open_failure_at",
        "last_sweep_finished_at", "last_sweep_examined", "last_sweep_drift",
    ) == [
        ("acct", "1688", 0, 0, None, 2, t(5, 0), t(6, 0), 40, 0),
        ("acct", "taobao", 2, 3, t(6, 0), 0, None, t(6, 0), 120, 3),
        ("acct", None, 1, 1, t(6, 1), 0, None, None, None, None),
    ]  # fmt: skip
    assert rows[1]["oldest_unprocessed_age"] == now - t(6, 0)
    assert rows[1]["last_sweep_age"] == now - t(6, 0)
    assert rows[1]["last_sweep_started_at"] == t(5, 23, 45)
    assert rows[1]["sweep_cursor_at"] == t(5, 23)
    assert rows[0]["oldest_unprocessed_age"] is None
    assert _pick(
        rows, "unmapped_values", "unmapped_last_seen_at", "last_refund_sweep_finished_at",
        "last_refund_sweep_examined", "last_refund_sweep_drift", "refund_sweep_cursor_at",
    ) == [
        (1, t(2, 6), None, None, None, None),
        (1, t(4, 4), t(5, 23, 55), 7, 1, t(5, 22)),
        (0, None, None, None, None, None),
    ]  # fmt: skip


async def test_unmapped_values_count_the_orders_that_hold_them_now(
    db_session: AsyncSession,
) -> None:
    await known_ledger(db_session)
    rows = await _rows(db_session, "SELECT * FROM report_unmapped_values ORDER BY field")
    assert _pick(
        rows, "platform", "field", "value", "seen_count", "first_seen_at", "last_seen_at", "orders"
    ) == [
        ("taobao", "parcel_status", "LOST_IN_SPACE", 3, t(2, 5), t(4, 4), 1),
        ("1688", "refund_status", "weird", 1, t(2, 5), t(2, 6), 0),
    ]  # fmt: skip


async def test_sales_lines_of_paid_orders_give_top_products(db_session: AsyncSession) -> None:
    await known_ledger(db_session)
    rows = await _rows(
        db_session,
        "SELECT product_id, sum(quantity) AS quantity, sum(amount) AS amount, count(*) AS lines "
        "FROM report_sales_lines WHERE paid_at >= :since GROUP BY product_id "
        "ORDER BY amount DESC",
        since=t(1, 0),
    )
    # O3 (never paid) is left out: its 200.00 of P1 does not count.
    assert _pick(rows, "product_id", "quantity", "amount", "lines") == [
        ("P1", 3, D("90.00"), 2),
        ("P2", 2, D("50.00"), 2),
        ("P3", 1, D("20.50"), 1),
    ]
    line = (await _rows(db_session, "SELECT * FROM report_sales_lines WHERE order_id = 'O5'"))[0]
    assert (line["paid_day"], line["title"], line["unit_price"]) == (
        date(2026, 11, 2), "title P2", D("10.00"),
    )  # fmt: skip


async def test_price_changes_with_their_order(db_session: AsyncSession) -> None:
    pks = await known_ledger(db_session)
    rows = await _rows(db_session, "SELECT * FROM report_price_changes")
    assert len(rows) == 1
    change: Mapping[str, Any] = rows[0]
    assert (change["order_pk"], change["order_id"], change["platform"]) == (
        pks["o2"], "O2", "taobao",
    )  # fmt: skip
    assert (change["old_total_amount"], change["new_total_amount"], change["total_change"]) == (
        D("60.50"), D("50.50"), D("-10.00"),
    )  # fmt: skip
    assert (change["observed_day"], change["source"]) == (date(2026, 11, 2), "webhook")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            "SELECT * FROM report_daily_sales WHERE day >= DATE '2026-11-01'",
            ["ix_orders_upstream_created_at", "Index Cond: ((upstream_created_at >="],
        ),
        (
            "SELECT * FROM report_daily_sales WHERE day >= DATE '2026-11-01'",
            ["ix_orders_paid_at", "Index Cond: ((paid_at >="],
        ),
        (
            "SELECT * FROM report_daily_sales WHERE day >= DATE '2026-11-01'",
            ["ix_orders_cancelled_at", "Index Cond: ((cancelled_at >="],
        ),
        (
            "SELECT * FROM report_daily_sales WHERE day >= DATE '2026-11-01'",
            ["ix_refunds_resolved_at", "Index Cond: ((resolved_at >="],
        ),
        (
            "SELECT * FROM report_refunds WHERE requested_at >= now()",
            ["ix_refunds_requested_at", "Index Cond: (requested_at >="],
        ),
        (
            "SELECT * FROM report_fulfilment WHERE paid_at >= now()",
            ["ix_orders_paid_at", "uq_shipments_order_pk_tracking_number"],
        ),
        (
            "SELECT * FROM report_sales_lines WHERE paid_at >= now()",
            ["ix_orders_paid_at", "uq_order_lines_order_pk_line_id"],
        ),
        (
            "SELECT * FROM report_price_changes WHERE observed_at >= now()",
            ["ix_order_price_changes_observed_at", "Index Cond: (observed_at >="],
        ),
    ],
)
async def test_time_filters_reach_the_reporting_indexes(
    db_session: AsyncSession, query: str, expected: list[str]
) -> None:
    # With sequential scans priced out, a plan without these means the filter cannot use the
    # index (a time zone expression in the way, say), whatever the table size.
    await db_session.execute(text("SET LOCAL enable_seqscan = off"))
    plan = "\n".join(row[0] for row in (await db_session.execute(text(f"EXPLAIN {query}"))).all())
    for fragment in expected:
        assert fragment in plan, plan
