"""Orders living realistic lives through the sandbox's control API, and bad clients.

Each order, with seeded draws: created (one to three lines), often re-priced before payment,
sometimes cancelled unpaid; paid, sometimes cancelled by the seller; shipped with a trace,
more trace steps, signed for, confirmed; some refunded (opened, then refunded, rejected or
withdrawn). Every logistics step is followed by a change that sends a message (the buyer's
confirmation), since logistics alone move without one (the refresh job's business, hours
later, out of the soak's reach).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from service.pandapon.signer import Credentials, signed_headers
from service.sandbox.remote import SandboxControlError, SandboxRemote

TITLES = ("加厚保温杯 500ml", "纯棉T恤 男款", "蓝牙耳机 降噪", "收纳箱 大号", "运动袜 5双装")
TRACE = (
    ("TRANSPORT", "【杭州市】 快件已发往 广州中心", "浙江省 杭州市"),
    ("TRANSPORT", "【广州市】 快件已到达 广州中心", "广东省 广州市"),
    ("DELIVERING", "【广州市】 快件正在派送中", "广东省 广州市"),
)


@dataclass
class Progress:
    total: int
    done: int = 0
    changes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


async def live(sb: SandboxRemote, rng: random.Random, progress: Progress) -> None:
    """One order's whole life."""
    platform = rng.choice(("taobao", "1688"))
    lines = [
        {
            "title": rng.choice(TITLES),
            "quantity": rng.randint(1, 4),
            "unit_price": str(Decimal(rng.randint(199, 29999)).scaleb(-2)),
        }
        for _ in range(rng.randint(1, 3))
    ]
    shipping = rng.choice(("0", "5", "8", "12"))
    order = await sb.create_order(platform, lines, shipping_fee=shipping)
    oid = order["order_id"]
    count = progress.changes
    count["created"] += 1
    if rng.random() < 0.5:
        total = Decimal(order["total_amount"])
        cut = (total * Decimal(rng.randint(1, 15)) / 100).quantize(Decimal("0.01"))
        await sb.change_price(platform, oid, total_amount=str(total - cut))
        count["price_changed"] += 1
    if rng.random() < 0.08:
        await sb.cancel(platform, oid, reason="buyerCancel")
        count["cancelled_unpaid"] += 1
        return
    if rng.random() < 0.04:
        count["left_unpaid"] += 1
        return
    paid = await sb.pay(platform, oid)
    count["paid"] += 1
    if rng.random() < 0.06:
        await sb.cancel(platform, oid, reason="sellerCancel")
        count["cancelled_paid"] += 1
        return
    if rng.random() < 0.05:
        await refund(sb, rng, platform, oid, Decimal(paid["total_amount"]), count)
        return
    trace = [dict(zip(("status", "description", "location"), rng.choice(TRACE), strict=True))]
    tracking = await sb.ship(platform, oid, events=[{"description": "快件已揽收", **trace[0]}])
    count["shipped"] += 1
    for _ in range(rng.randint(0, 2)):
        status, text, where = rng.choice(TRACE)
        await sb.add_event(platform, oid, tracking, text, status=status, location=where)
        count["trace_steps"] += 1
    if rng.random() < 0.9:
        await sb.deliver(platform, oid, tracking)
        count["delivered"] += 1
    confirmed = await sb.confirm(platform, oid)
    count["completed"] += 1
    if rng.random() < 0.12:
        await refund(sb, rng, platform, oid, Decimal(confirmed["total_amount"]), count)


async def refund(
    sb: SandboxRemote,
    rng: random.Random,
    platform: str,
    oid: str,
    total: Decimal,
    count: Counter[str],
) -> None:
    share = Decimal(rng.choice((20, 50))) / 100
    amount = max(Decimal("0.01"), (total * share).quantize(Decimal("0.01")))
    opened = await sb.open_refund(platform, oid, str(amount), reason="少件")
    count["refunds_opened"] += 1
    if rng.random() < 0.8:
        outcome = rng.choice(("refunded", "refunded", "rejected", "cancelled"))
        await sb.resolve_refund(platform, opened["refund_id"], outcome)
        count[f"refunds_{outcome}"] += 1


async def drive(
    sandbox_url: str, orders: int, *, seed: int, concurrency: int, progress: Progress
) -> None:
    """Live ``orders`` orders, ``concurrency`` at a time; their seeds are fixed per order."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(orders):
        queue.put_nowait(n)
    # A connection per request: a kept-alive one can be closed by the sandbox (its idle timeout,
    # reached when a busy machine stalls a lane) just as a request is sent on it, and an action
    # cannot be resent blindly (it may have been done).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as http:
        sb = SandboxRemote(sandbox_url, http)

        async def lane() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                try:
                    await live(sb, random.Random(f"{seed}:{n}"), progress)
                except SandboxControlError as error:  # a bug of the soak, reported at the end
                    progress.errors.append(f"order #{n}: {error}")
                progress.done += 1

        await asyncio.gather(*(lane() for _ in range(concurrency)))


# --- bad clients ----------------------------------------------------------------------------

BAD_MARKER = "SOAKBAD"
BAD_KINDS = (
    "unsigned",
    "bad_signature",
    "replayed",
    "oversized",
    "malformed_json",
    "not_json",
)
EXPECTED = {
    "unsigned": 401,
    "bad_signature": 401,
    "replayed": 401,
    "oversized": 413,
    "malformed_json": 400,
    "not_json": 415,
}

# PandaPon's signature covers the headers, not the body: a replay is refused by the inbox write
# that records its nonce, so its verdict waits for the store like a genuine message's.
DECIDED_AT_STORE = frozenset({"replayed"})


@dataclass(frozen=True, slots=True)
class BadRequest:
    kind: str
    target: int  # index of the web process
    started: float
    finished: float
    status: int | None  # None: no HTTP answer (connection refused or reset)
    error: str | None  # the exception's name when there was no answer, else the refusal reason


def bad_envelope(n: int) -> dict[str, Any]:
    """A well-formed Taobao status message about an order that does not exist, marked."""
    return {
        "messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
        "messagePlatform": 0,
        "timestamp": str(int(time.time() * 1000)),
        "messageBody": {
            "salesOrderId": f"424242{n:012d}",
            "subOrders": [],
            "remark": f"{BAD_MARKER}-{n}",
        },
    }


def bad_request(
    kind: str, n: int, credentials: Credentials, captured: list[dict[str, str]]
) -> tuple[bytes, dict[str, str]] | None:
    body = json.dumps(bad_envelope(n)).encode()
    json_type = {"content-type": "application/json"}
    if kind == "unsigned":
        return body, json_type
    if kind == "bad_signature":
        headers = signed_headers(credentials)
        headers["signature"] = "0" * len(headers["signature"])
        return body, {**headers, **json_type}
    if kind == "replayed":
        if not captured:
            return None
        # A genuine request's headers, seen on the wire, with a body of the attacker's.
        genuine = captured[n % len(captured)]
        keep = ("access-key", "timestamp", "nonce-str", "user-id", "signature")
        return body, {**{k: genuine[k] for k in keep if k in genuine}, **json_type}
    if kind == "oversized":
        filler = BAD_MARKER * (1024 * 1024 // len(BAD_MARKER) + 1)
        envelope = bad_envelope(n)
        envelope["messageBody"]["padding"] = filler
        return json.dumps(envelope).encode(), {**signed_headers(credentials), **json_type}
    if kind == "malformed_json":
        return body[: len(body) // 2], {**signed_headers(credentials), **json_type}
    if kind == "not_json":
        return body, {**signed_headers(credentials), "content-type": "text/plain"}
    raise ValueError(kind)


def describe(bad: BadRequest) -> str:
    """``kind:status:reason``, or ``kind:ExceptionName`` when there was no answer."""
    return ":".join(str(part) for part in (bad.kind, bad.status, bad.error) if part is not None)


def refusal_reason(response: httpx.Response) -> str | None:
    """The receiver's ``{"error": reason}``, if the answer carries one."""
    try:
        reason = response.json().get("error")
    except ValueError:
        return None
    return reason if isinstance(reason, str) else None


async def bad_clients(
    web_ports: list[int],
    credentials: Credentials,
    captured: Callable[[], list[dict[str, str]]],
    stop: asyncio.Event,
    results: list[BadRequest],
    *,
    rate_per_s: float,
) -> None:
    """Bad requests at a steady rate, in turn to each web process, each kind in turn."""
    interval = 1.0 / rate_per_s
    n = 0
    tasks: set[asyncio.Task[None]] = set()
    # A connection per request: a kept-alive one can be closed by the server (its idle
    # timeout) just as a request is sent on it, and that race would look like a server fault.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=10, trust_env=False, limits=fresh) as http:

        async def one(kind: str, target: int, request: tuple[bytes, dict[str, str]]) -> None:
            body, headers = request
            started = time.monotonic()
            url = f"http://127.0.0.1:{web_ports[target]}/webhooks/pandapon"
            try:
                response = await http.post(url, content=body, headers=headers)
                status, error = response.status_code, refusal_reason(response)
            except httpx.HTTPError as failure:
                status, error = None, type(failure).__name__
            results.append(BadRequest(kind, target, started, time.monotonic(), status, error))

        next_at = time.monotonic()
        while not stop.is_set():
            kind = BAD_KINDS[n % len(BAD_KINDS)]
            request = bad_request(kind, n, credentials, captured())
            if request is not None:
                # Every kind goes to every process in turn.
                target = (n // len(BAD_KINDS)) % len(web_ports)
                task = asyncio.create_task(one(kind, target, request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            n += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)
