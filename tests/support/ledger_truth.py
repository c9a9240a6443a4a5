"""Compare the ledger, through SQL, with the sandbox's ground truth.

Written from the contract (the neutral truth of docs/sandbox.md and the ledger columns of
docs/reporting.md), independently of the client's mapping, so a mapping bug shows as a
difference here.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from service.db import asyncpg_dsn


def _amount(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value)).quantize(Decimal("0.01"))


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def knowable_refund_status(refund: dict[str, Any]) -> str:
    """The status the ledger can know of a truth refund.

    1688 has no final "refused": a refusal shows as ``waitbuyermodify``, which is still open
    (the buyer may amend, docs/upstream.md#evidence), so the ledger holds it as ``requested``.
    """
    if refund["platform"] == "1688" and refund["status"] == "rejected":
        return "requested"
    status: str = refund["status"]
    return status


def expected_refund_state(refunds: list[dict[str, Any]]) -> str:
    statuses = {knowable_refund_status(r) for r in refunds}
    for state in ("requested", "refunded", "rejected"):
        if state in statuses:
            return state
    return "none"


async def _trail(conn: asyncpg.Connection, account_id: str, truth: dict[str, Any]) -> str:
    """What the service saw of an order it does not hold: its inbox rows and failures."""
    key = (account_id, truth["platform"], truth["order_id"])
    inbox = await conn.fetch(
        "SELECT id, message_type, state, received_at, queued_at, processed_at FROM webhook_inbox"
        " WHERE account_id = $1 AND platform = $2 AND order_id = $3 ORDER BY id",
        *key,
    )
    failures = await conn.fetch(
        "SELECT kind, source, attempts, error, resolved_at FROM sync_failures"
        " WHERE account_id = $1 AND platform = $2 AND order_id = $3",
        *key,
    )
    return f"inbox {[dict(r) for r in inbox]}, failures {[dict(r) for r in failures]}"


async def order_mismatches(
    conn: asyncpg.Connection, account_id: str, truth: dict[str, Any]
) -> list[str]:
    """Every difference between one truth order and its ledger rows ([] when equal)."""
    key = f"{truth['platform']}/{truth['order_id']}"
    row = await conn.fetchrow(
        "SELECT * FROM orders WHERE account_id = $1 AND platform = $2 AND order_id = $3",
        account_id,
        truth["platform"],
        truth["order_id"],
    )
    if row is None:
        return [f"{key}: missing from the ledger; {await _trail(conn, account_id, truth)}"]
    problems: list[str] = []

    def differ(what: str, ours: Any, theirs: Any) -> None:
        if ours != theirs:
            problems.append(f"{key}: {what} is {ours!r}, truth {theirs!r}")

    differ("status", row["status"], truth["status"])
    for name in ("total_amount", "product_amount", "shipping_fee", "refunded_amount"):
        if truth.get(name) is not None:
            differ(name, _amount(row[name]), _amount(truth[name]))
    differ("refund_state", row["refund_state"], expected_refund_state(truth["refunds"]))
    # Upstream times, in every platform and spelling (whole seconds in the truth).
    differ("upstream_created_at", row["upstream_created_at"], _time(truth["created_at"]))
    differ("upstream_modified_at", row["upstream_modified_at"], _time(truth["modified_at"]))
    differ("paid_at", row["paid_at"], _time(truth["paid_at"]))

    lines = {
        (r["line_id"], r["quantity"], _amount(r["amount"]))
        for r in await conn.fetch(
            "SELECT line_id, quantity, amount FROM order_lines WHERE order_pk = $1", row["id"]
        )
    }
    differ(
        "lines",
        lines,
        {(t["line_id"], t["quantity"], _amount(t["amount"])) for t in truth["lines"]},
    )

    shipments = {
        r["tracking_number"]: (r["events"], r["delivered_at"] is not None)
        for r in await conn.fetch(
            "SELECT s.tracking_number, s.delivered_at, "
            "(SELECT count(*) FROM shipment_events e WHERE e.shipment_id = s.id) AS events "
            "FROM shipments s WHERE s.order_pk = $1",
            row["id"],
        )
    }
    differ(
        "shipments (events, delivered)",
        shipments,
        {
            s["tracking_number"]: (len(s["events"]), bool(s["delivered"]))
            for s in truth["shipments"]
        },
    )

    refunds = {
        (r["refund_id"], r["status"], _amount(r["amount"]))
        for r in await conn.fetch(
            "SELECT refund_id, status, amount FROM refunds WHERE order_pk = $1", row["id"]
        )
    }
    differ(
        "refunds",
        refunds,
        {
            (r["refund_id"], knowable_refund_status(r), _amount(r["amount"]))
            for r in truth["refunds"]
        },
    )

    history = await conn.fetch(
        "SELECT from_status, to_status, from_raw_status, to_raw_status "
        "FROM order_status_history WHERE order_pk = $1 ORDER BY id",
        row["id"],
    )
    if not history:
        problems.append(f"{key}: no status history")
    else:
        differ("last history status", history[-1]["to_status"], truth["status"])
        for h in history:
            if (h["from_status"], h["from_raw_status"]) == (h["to_status"], h["to_raw_status"]):
                problems.append(f"{key}: history row that changes nothing: {dict(h)}")
        for before, after in itertools.pairwise(history):
            if before["to_raw_status"] != after["from_raw_status"]:
                problems.append(f"{key}: history rows do not chain: {dict(before)} {dict(after)}")
    return problems


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on its own connection (tests read the ledger through plain SQL)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def ledger_mismatches(
    database_url: str, account_id: str, truths: list[dict[str, Any]]
) -> list[str]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        problems: list[str] = []
        for truth in truths:
            problems += await order_mismatches(conn, account_id, truth)
        return problems
    finally:
        await conn.close()


async def wait_for_ledger(
    database_url: str,
    account_id: str,
    truths: list[dict[str, Any]],
    *,
    within_s: float = 60.0,
) -> None:
    """Wait until the ledger equals the truth; fail listing the differences if it never does."""
    deadline = time.monotonic() + within_s
    while True:
        problems = await ledger_mismatches(database_url, account_id, truths)
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(problems)} difference(s) from the truth:\n" + "\n".join(problems[:40])
            )
        await asyncio.sleep(0.25)
