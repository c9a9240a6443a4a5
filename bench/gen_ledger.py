"""Fill a ledger with N realistic generated orders, fast, through COPY.

    python -m bench.gen_ledger --orders 1000000 --database-url postgresql+asyncpg://…/db

The database is migrated to head first. Orders are spread over ``--days`` days ending at
``--now`` (default: now) in creation order, as a live ledger grows, with their lines, status
history, price changes, shipments and trace events, refunds, one processed webhook message
each, a small unprocessed backlog, a few sync failures and the sweep cursors. The same seed and
``--now`` give the same ledger. The ledger tables must be empty (``--truncate`` empties them).

Shape (per order, on average): 1.7 lines, 3.8 status-history rows, 0.93 parcels with 3 to 6
trace events each, 0.06 refunds, 0.09 price changes. Platforms: 60 % Taobao, 40 % 1688.
1,000,000 orders make 13.3 million rows in about three minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from service.db import asyncpg_dsn

LEDGER_TABLES = [
    "shipment_events",
    "shipments",
    "refunds",
    "order_price_changes",
    "order_status_history",
    "order_lines",
    "orders",
    "webhook_inbox",
    "sync_failures",
    "sweep_cursors",
]

ORDER_COLUMNS = [
    "id", "account_id", "platform", "order_id", "status", "raw_status", "refund_state",
    "currency", "total_amount", "product_amount", "shipping_fee", "discount_amount",
    "refunded_amount", "close_reason", "upstream_created_at", "upstream_modified_at", "paid_at",
    "shipped_at", "delivered_at", "completed_at", "cancelled_at", "snapshot_at", "first_seen_at",
    "last_synced_at",
]  # fmt: skip
LINE_COLUMNS = [
    "account_id", "order_pk", "line_id", "product_id", "sku_id", "title", "quantity",
    "unit_price", "amount", "raw_status",
]  # fmt: skip
HISTORY_COLUMNS = [
    "account_id", "order_pk", "from_status", "to_status", "from_raw_status", "to_raw_status",
    "upstream_modified_at", "observed_at", "source", "inbox_id",
]  # fmt: skip
PRICE_COLUMNS = [
    "account_id", "order_pk", "currency", "old_total_amount", "new_total_amount",
    "old_product_amount", "new_product_amount", "old_shipping_fee", "new_shipping_fee",
    "upstream_modified_at", "observed_at", "source",
]  # fmt: skip
SHIPMENT_COLUMNS = [
    "id", "account_id", "order_pk", "tracking_number", "line_id", "carrier", "carrier_code",
    "raw_status", "first_event_at", "last_event_at", "delivered_at", "last_synced_at",
]  # fmt: skip
EVENT_COLUMNS = [
    "account_id", "shipment_id", "event_key", "event_at", "status", "description", "location",
    "observed_at",
]  # fmt: skip
REFUND_COLUMNS = [
    "account_id", "platform", "refund_id", "order_pk", "line_id", "status", "raw_status",
    "currency", "amount", "reason", "requested_at", "resolved_at", "upstream_modified_at",
    "last_synced_at",
]  # fmt: skip
INBOX_COLUMNS = [
    "id", "account_id", "dedupe_key", "received_at", "message_type", "kind", "platform",
    "order_id", "refund_id", "pushed_at", "raw_body", "headers", "request_id", "state",
    "queued_at", "processed_at",
]  # fmt: skip
FAILURE_COLUMNS = [
    "account_id", "platform", "order_id", "kind", "source", "error", "endpoint", "http_status",
    "upstream_code", "upstream_msg", "attempts", "first_failed_at", "last_failed_at",
    "replayed_at", "replay_count", "resolved_at",
]  # fmt: skip

# Raw upstream statuses by normalized status.
RAW_STATUS = {
    "taobao": {
        "pending_payment": "WAIT_BUYER_PAY",
        "paid": "WAIT_SELLER_SEND_GOODS",
        "shipped": "WAIT_BUYER_CONFIRM_GOODS",
        "completed": "TRADE_FINISHED",
        "cancelled": "TRADE_CLOSED",
    },
    "1688": {
        "pending_payment": "waitbuyerpay",
        "paid": "waitsellersend",
        "shipped": "waitbuyerreceive",
        "completed": "success",
        "cancelled": "cancel",
    },
}
REFUND_RAW = {
    "requested": "WAIT_SELLER_AGREE",
    "refunded": "SUCCESS",
    "rejected": "SELLER_REFUSE_BUYER",
    "cancelled": "CLOSED",
}
REFUND_STATE = {
    "requested": "requested",
    "refunded": "refunded",
    "rejected": "rejected",
    "cancelled": "none",
}
CARRIERS = [
    ("中通快递", "ZTO", 30),
    ("圆通速递", "YTO", 22),
    ("韵达快递", "YUNDA", 16),
    ("申通快递", "STO", 12),
    ("极兔速递", "JTSD", 10),
    ("顺丰速运", "SF", 7),
    ("邮政快递包裹", "YZPY", 3),
]
CITIES = ["杭州", "广州", "义乌", "深圳", "上海", "苏州", "泉州", "东莞", "宁波", "北京"]
SHIPPING_FEES = [0, 0, 600, 1000]  # cents
DISCOUNTS = [0] * 8 + [300, 500]
HOUR = 3600.0
DAY = 86400.0
EPOCH_2000 = datetime(2000, 1, 1, tzinfo=UTC).timestamp()

# Rows carry times and money in their wire form: encoding a datetime or a Decimal costs more
# than generating the whole row. A time is (microseconds since 2000-01-01 UTC,), the tuple
# format of asyncpg's timestamptz codec; money is integer cents, encoded by numeric_binary.


def wire_time(seconds: float) -> tuple[int]:
    return (int((seconds - EPOCH_2000) * 1_000_000),)


def numeric_binary(cents: int) -> bytes:
    """Postgres' binary numeric (base-10000 digits) for ``cents / 100``, scale 2."""
    sign = 0x4000 if cents < 0 else 0
    whole, frac = divmod(abs(cents), 100)
    digits = []
    while whole:
        whole, digit = divmod(whole, 10_000)
        digits.append(digit)
    digits.reverse()
    weight = len(digits) - 1
    if frac:
        digits.append(frac * 100)
    return struct.pack(f"!hhhh{len(digits)}h", len(digits), weight, sign, 2, *digits)


async def use_wire_codecs(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=_same, decoder=_same, format="tuple"
    )
    await conn.set_type_codec(
        "numeric", schema="pg_catalog", encoder=numeric_binary, decoder=bytes, format="binary"
    )


def _same(value: Any) -> Any:
    return value


@dataclass
class Batch:
    orders: list[tuple[Any, ...]] = field(default_factory=list)
    lines: list[tuple[Any, ...]] = field(default_factory=list)
    history: list[tuple[Any, ...]] = field(default_factory=list)
    prices: list[tuple[Any, ...]] = field(default_factory=list)
    shipments: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    refunds: list[tuple[Any, ...]] = field(default_factory=list)
    inbox: list[tuple[Any, ...]] = field(default_factory=list)
    failures: list[tuple[Any, ...]] = field(default_factory=list)

    def copies(self) -> list[tuple[str, list[str], list[tuple[Any, ...]]]]:
        """(table, columns, rows) in foreign-key order."""
        return [
            ("orders", ORDER_COLUMNS, self.orders),
            ("webhook_inbox", INBOX_COLUMNS, self.inbox),
            ("order_lines", LINE_COLUMNS, self.lines),
            ("order_status_history", HISTORY_COLUMNS, self.history),
            ("order_price_changes", PRICE_COLUMNS, self.prices),
            ("shipments", SHIPMENT_COLUMNS, self.shipments),
            ("shipment_events", EVENT_COLUMNS, self.events),
            ("refunds", REFUND_COLUMNS, self.refunds),
            ("sync_failures", FAILURE_COLUMNS, self.failures),
        ]


@dataclass(frozen=True)
class Product:
    product_id: str
    title: str
    price: int  # cents


class LedgerGenerator:
    """Makes the rows of orders ``1..total`` in batches; deterministic for a seed and ``now``."""

    def __init__(self, total: int, *, now: datetime, days: float, accounts: int, seed: int) -> None:
        self.total = total
        self.now = now
        self.span = days * DAY
        self.start = now - timedelta(seconds=self.span)
        self.accounts = [f"acct-{k + 1}" for k in range(accounts)]
        self.seed = seed
        catalog = random.Random(seed)
        self.products = {
            platform: [
                Product(
                    product_id=f"{prefix}{600000000000 + k}",
                    title=f"{platform} product {k}",
                    price=int(catalog.lognormvariate(3.6, 0.8) * 100 + 100),
                )
                for k in range(4000)
            ]
            for platform, prefix in (("taobao", ""), ("1688", "9"))
        }
        weights = [w for _, _, w in CARRIERS]
        self.carrier_table = [c for c, w in zip(CARRIERS, weights, strict=True) for _ in range(w)]
        self.next_shipment = 1

    def batch(self, first: int, last: int) -> Batch:
        """Rows for order ids ``first..last`` (inclusive); call with increasing ranges."""
        rnd = random.Random(self.seed * 1_000_003 + first)
        r = rnd.random
        expo = rnd.expovariate
        out = Batch()
        orders_append = out.orders.append
        history_append = out.history.append
        lines_append = out.lines.append
        events_append = out.events.append
        now = self.now
        now_s = now.timestamp()
        start_s = self.start.timestamp()
        step = self.span / self.total
        accounts = self.accounts
        n_accounts = len(accounts)

        at = wire_time
        for pk in range(first, last + 1):
            account = (
                accounts[0] if n_accounts == 1 or r() < 0.7 else accounts[1 + pk % (n_accounts - 1)]
            )
            platform = "taobao" if r() < 0.6 else "1688"
            raw = RAW_STATUS[platform]
            order_id = (
                f"{(3_800_000_000_000_000 if platform == 'taobao' else 2_100_000_000_000) + pk}"
            )
            created = start_s + (pk - 1) * step + r() * step

            # Lines and amounts.
            products = self.products[platform]
            n_lines = 1 if r() < 0.55 else (2 if r() < 0.6 else (3 if r() < 0.7 else 4))
            product_amount = 0
            order_lines = []
            for k in range(n_lines):
                product = products[int(len(products) * r() ** 3)]
                quantity = 1 + int(expo(1.2)) if platform == "taobao" else 2 + int(expo(0.1))
                amount = product.price * quantity
                product_amount += amount
                order_lines.append((k + 1, product, quantity, amount))
            shipping_fee = SHIPPING_FEES[int(r() * 4)]
            discount = DISCOUNTS[int(r() * 10)]
            total = product_amount + shipping_fee - discount

            # The timeline, cut at now.
            status = "pending_payment"
            paid = shipped = delivered = completed = cancelled = None
            pay_after = created + 60 + expo(1 / 1800)
            if r() < 0.08:
                cancel_at = created + HOUR + expo(1 / (12 * HOUR))
                if cancel_at <= now_s:
                    status, cancelled = "cancelled", cancel_at
            elif pay_after <= now_s:
                status, paid = "paid", pay_after
                ship_at = (
                    paid + 2 * HOUR + expo(1 / (30 * HOUR if platform == "taobao" else 50 * HOUR))
                )
                if ship_at <= now_s:
                    status, shipped = "shipped", ship_at
                    deliver_at = shipped + 12 * HOUR + expo(1 / (45 * HOUR))
                    if deliver_at <= now_s:
                        delivered = deliver_at
                        complete_at = delivered + expo(1 / (3 * DAY))
                        if complete_at <= now_s:
                            status, completed = "completed", complete_at

            # A refund on 7 % of paid orders: before shipping (full) or after (one line).
            refund = None
            if paid is not None and r() < 0.07:
                before_ship = shipped is None or r() < 0.35
                if before_ship:
                    requested = paid + 1800 + expo(1 / (10 * HOUR))
                    line_no, amount = None, total
                else:
                    assert shipped is not None
                    requested = shipped + 6 * HOUR + expo(1 / (60 * HOUR))
                    line_no, _, _, amount = order_lines[int(r() * n_lines)]
                resolve_at = requested + 600 + expo(1 / (30 * HOUR))
                if requested > now_s:
                    pass
                elif resolve_at > now_s:
                    refund = ("requested", requested, None, line_no, amount)
                else:
                    x = r()
                    outcome = "refunded" if x < 0.7 else ("rejected" if x < 0.85 else "cancelled")
                    refund = (outcome, requested, resolve_at, line_no, amount)
                    if outcome == "refunded" and before_ship:
                        # A full refund before shipping closes the order.
                        status, cancelled = "cancelled", resolve_at
                        shipped = delivered = completed = None

            refund_state = "none"
            refunded_amount = 0
            if refund is not None:
                outcome, requested, resolved, line_no, amount = refund
                refund_state = REFUND_STATE[outcome]
                if outcome == "refunded":
                    refunded_amount = amount
                out.refunds.append(
                    (
                        account, platform, f"RF{pk}", pk,
                        None if line_no is None else str(line_no), outcome, REFUND_RAW[outcome],
                        "CNY", amount, "不想要了" if line_no is None else "质量问题",
                        at(requested), None if resolved is None else at(resolved),
                        at(resolved or requested), at(resolved or requested),
                    )
                )  # fmt: skip

            # Status history: every transition reached, observed a little after it happened.
            steps: list[tuple[str, float]] = [("pending_payment", created)]
            if paid is not None:
                steps.append(("paid", paid))
            if shipped is not None:
                steps.append(("shipped", shipped))
            if completed is not None:
                steps.append(("completed", completed))
            if cancelled is not None:
                steps.append(("cancelled", cancelled))
            last_change = steps[-1][1]
            observed = last_change + 2 + expo(1 / 20)
            source = "webhook" if r() < 0.95 else "sweep"

            # The message about the last change: processed, unless it came in the last minutes (a
            # repeated hint about an order already reconciled, still waiting in the backlog).
            state = "processed"
            if observed > now_s - 600:
                state = "queued" if r() < 0.8 else "received"
                observed = min(observed, now_s)
            received = min(last_change + 1 + r(), now_s)
            message_type = "TAOBAO_ORDER_STATUS" if platform == "taobao" else "1688_ORDER_STATUS"
            out.inbox.append(
                (
                    pk, account, f"{pk:032x}", at(received), message_type, "status", platform,
                    order_id, None, at(received - 0.5),
                    f'{{"messageType":"{message_type}","data":{{"orderId":"{order_id}",'
                    f'"status":"{raw[status]}"}}}}'.encode(),
                    '{"user-agent": "PandaPon-Callback/1.0"}', f"req-{pk}", state,
                    at(received + 0.2) if state != "received" else None,
                    at(observed) if state == "processed" else None,
                )
            )  # fmt: skip
            previous: str | None = None
            for k, (to_status, when) in enumerate(steps):
                is_last = k == len(steps) - 1
                history_append(
                    (
                        account, pk, previous, to_status,
                        None if previous is None else raw[previous], raw[to_status], at(when),
                        at(observed if is_last else when + 3 + 40 * r()),
                        source if is_last else "webhook",
                        pk if is_last and state == "processed" else None,
                    )
                )  # fmt: skip
                previous = to_status

            # Seller price adjustments happen before payment.
            if paid is not None and r() < 0.1:
                change = DISCOUNTS[8 + int(r() * 2)] + 100 * int(r() * 20)
                when = created + (paid - created) * r()
                out.prices.append(
                    (
                        account, pk, "CNY", total + change, total, product_amount + change,
                        product_amount, shipping_fee, shipping_fee, at(when), at(when + 5),
                        "webhook",
                    )
                )  # fmt: skip

            for line_no, product, quantity, amount in order_lines:
                lines_append(
                    (
                        account, pk, str(line_no), product.product_id,
                        f"{product.product_id}-{quantity % 4}", product.title, quantity,
                        product.price, amount, raw[status],
                    )
                )  # fmt: skip

            # Parcels: one, sometimes two for a multi-line order; trace events up to now.
            if shipped is not None:
                parcels = 2 if n_lines > 1 and r() < 0.08 else 1
                for p in range(parcels):
                    sid = self.next_shipment
                    self.next_shipment += 1
                    carrier, carrier_code, _ = self.carrier_table[
                        int(r() * len(self.carrier_table))
                    ]
                    first_event = shipped + 600 + expo(1 / (3 * HOUR))
                    parcel_delivered = (
                        delivered if delivered is not None and first_event < delivered else None
                    )
                    end = (
                        parcel_delivered
                        if parcel_delivered is not None
                        else min(now_s, first_event + 3 * DAY)
                    )
                    if first_event > now_s:
                        first_event_at = last_event_at = None
                    else:
                        first_event_at = at(first_event)
                        hops = 2 + int(r() * 3)
                        city = CITIES[int(r() * len(CITIES))]
                        events_append(
                            (
                                account,
                                sid,
                                "1",
                                first_event_at,
                                "ACCEPT",
                                f"【{city}】已揽收",
                                city,
                                first_event_at,
                            )
                        )
                        when = first_event
                        for h in range(hops):
                            when = first_event + (end - first_event) * (h + 1) / (hops + 1)
                            stop = CITIES[int(r() * len(CITIES))]
                            events_append(
                                (
                                    account,
                                    sid,
                                    str(h + 2),
                                    at(when),
                                    "TRANSPORT",
                                    f"快件已到达【{stop}】",
                                    stop,
                                    at(when),
                                )
                            )
                        if parcel_delivered is not None:
                            when = parcel_delivered
                            events_append(
                                (
                                    account,
                                    sid,
                                    str(hops + 2),
                                    at(when),
                                    "SIGN",
                                    "已签收",
                                    None,
                                    at(when),
                                )
                            )
                        last_event_at = at(when)
                    out.shipments.append(
                        (
                            sid, account, pk, f"{carrier_code}{7_000_000_000 + sid}",
                            None if parcels == 1 else str(p + 1), carrier, carrier_code,
                            "SIGN" if parcel_delivered is not None else "TRANSPORT",
                            first_event_at, last_event_at,
                            None if parcel_delivered is None else at(parcel_delivered),
                            at(observed),
                        )
                    )  # fmt: skip

            # A handful of orders could not be synced; the recent ones are still open.
            if r() < 0.0005:
                failed = created + 60
                resolved_failure = at(failed + 3 * HOUR) if failed < now_s - DAY else None
                out.failures.append(
                    (
                        account, platform, order_id, "permanent", "webhook",
                        "upstream refused the order query", "order_detail", 200, "40004",
                        "order not visible to this user", 1, at(failed), at(failed),
                        None, 0, resolved_failure,
                    )
                )  # fmt: skip

            modified = at(max(last_change, refund[2] or refund[1]) if refund else last_change)
            orders_append(
                (
                    pk, account, platform, order_id, status, raw[status], refund_state, "CNY",
                    total, product_amount, shipping_fee, discount, refunded_amount,
                    "buyer cancelled" if status == "cancelled" else None, at(created), modified,
                    None if paid is None else at(paid), None if shipped is None else at(shipped),
                    None if delivered is None else at(delivered),
                    None if completed is None else at(completed),
                    None if cancelled is None else at(cancelled), at(observed), at(created + 5),
                    at(observed),
                )
            )  # fmt: skip
        return out

    def sweep_cursors(self) -> list[tuple[Any, ...]]:
        rnd = random.Random(self.seed)
        now_s = self.now.timestamp()
        rows = []
        for account in self.accounts:
            for platform in ("taobao", "1688"):
                finished = now_s - 60 - rnd.random() * 600
                rows.append(
                    (
                        account,
                        platform,
                        wire_time(finished - 900),
                        wire_time(finished - 30),
                        wire_time(finished),
                        int(rnd.random() * 400),
                        int(rnd.random() * 4),
                    )
                )
        return rows


async def generate(
    url: str,
    orders: int,
    *,
    now: datetime | None = None,
    days: float = 730.0,
    accounts: int = 2,
    seed: int = 7,
    batch_size: int = 20_000,
    truncate: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Fill the (migrated) database at ``url``; returns the rows written per table."""
    generator = LedgerGenerator(
        orders, now=now or datetime.now(UTC), days=days, accounts=accounts, seed=seed
    )
    conn = await asyncpg.connect(asyncpg_dsn(url))
    counts = dict.fromkeys(LEDGER_TABLES, 0)
    try:
        # Generated data can be made again: don't wait for the disk on every batch.
        await conn.execute("SET synchronous_commit = off")
        await use_wire_codecs(conn)
        if await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            # The rows are consistent by construction: skip the per-row foreign-key triggers
            # (only a superuser may), which otherwise cost half the load time.
            await conn.execute("SET session_replication_role = replica")
        if truncate:
            await conn.execute(f"TRUNCATE {', '.join(LEDGER_TABLES)} RESTART IDENTITY CASCADE")
        elif await conn.fetchval("SELECT EXISTS (SELECT FROM orders)"):
            raise SystemExit("the ledger is not empty: pass --truncate to replace it")
        ranges = [(a, min(a + batch_size - 1, orders)) for a in range(1, orders + 1, batch_size)]
        # Make the next batch in a thread while this one is being copied.
        pending = (
            asyncio.create_task(asyncio.to_thread(generator.batch, *ranges[0])) if ranges else None
        )
        for k in range(len(ranges)):
            assert pending is not None
            batch = await pending
            if k + 1 < len(ranges):
                pending = asyncio.create_task(asyncio.to_thread(generator.batch, *ranges[k + 1]))
            async with conn.transaction():
                for table, columns, rows in batch.copies():
                    if rows:
                        await conn.copy_records_to_table(table, records=rows, columns=columns)
                        counts[table] += len(rows)
            if progress:
                progress(f"{ranges[k][1]:,} / {orders:,} orders")
        cursors = generator.sweep_cursors()
        await conn.copy_records_to_table(
            "sweep_cursors",
            records=cursors,
            columns=[
                "account_id", "platform", "last_started_at", "cursor_at", "last_finished_at",
                "last_examined", "last_drift",
            ],
        )  # fmt: skip
        counts["sweep_cursors"] = len(cursors)
        # Explicit ids were written: move the identities past them.
        for table in ("orders", "shipments", "webhook_inbox"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
            )
    finally:
        await conn.close()
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gen_ledger", description=__doc__)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("PANDASYNC_DATABASE_URL"),
        help="postgresql+asyncpg://… (default: PANDASYNC_DATABASE_URL)",
    )
    parser.add_argument("--days", type=float, default=730.0, help="history length (730)")
    parser.add_argument("--accounts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--now", type=datetime.fromisoformat, default=None, help="ISO time")
    parser.add_argument("--truncate", action="store_true", help="empty the ledger first")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url or PANDASYNC_DATABASE_URL is required")
    from service.ledger.migrations import run_migrations

    run_migrations(args.database_url)
    started = time.perf_counter()
    counts = asyncio.run(
        generate(
            args.database_url,
            args.orders,
            now=args.now,
            days=args.days,
            accounts=args.accounts,
            seed=args.seed,
            truncate=args.truncate,
            progress=lambda line: print(f"\r{line}", end="", file=sys.stderr, flush=True),
        )
    )
    elapsed = time.perf_counter() - started
    print(file=sys.stderr)
    for table, n in counts.items():
        print(f"{table:22} {n:>12,}")
    print(f"{sum(counts.values()):,} rows in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
