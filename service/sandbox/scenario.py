"""A seeded random scenario: orders that live plausible lives, for demos, soaks and benchmarks.

Each step picks one change that the order's state allows (pay, change the price, ship, a trace
step, deliver, confirm, cancel, open or resolve a refund), weighted so most orders get paid and
shipped. The same seed on a fresh world gives the same orders and the same changes.

Orders live over days, as purchase orders do: a new order was placed two or three weeks ago, and
each step comes a plausible while after the order's previous one (paid within hours, shipped
within a day or two, delivered days later, confirmed after that), never later than now (a
refund is resolved when the step is made: its modification time is its resolution time). So
the report views (time to ship, time in transit) show times like a real account's, and never a
negative one. The times are drawn from a generator of their own (seeded by the order and the
step), so they leave the sequence of changes a seed gives as it was.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal

from service.domain import OrderStatus, Platform, RefundStatus
from service.sandbox.world import NewEvent, NewLine, World, WorldOrder

_TITLES = (
    "加厚保温杯 500ml",
    "纯棉T恤 男款",
    "蓝牙耳机 降噪",
    "手机壳 透明",
    "收纳箱 大号",
    "不锈钢餐具套装",
    "儿童积木 100片",
    "运动袜 5双装",
)
_TRACE = (
    ("TRANSPORT", "【杭州市】 快件已发往 广州中心", "浙江省 杭州市"),
    ("TRANSPORT", "【广州市】 快件已到达 广州中心", "广东省 广州市"),
    ("DELIVERING", "【广州市】 快件正在派送中", "广东省 广州市"),
)


# How long after the order's previous step each kind of step comes: (shortest, longest).
_HOUR = 3600
_GAPS_S: dict[str, tuple[int, int]] = {
    "pay": (2 * 60, 3 * _HOUR),
    "price": (60, _HOUR),
    "cancel": (10 * 60, 12 * _HOUR),
    "ship": (3 * _HOUR, 40 * _HOUR),
    "trace": (2 * _HOUR, 14 * _HOUR),
    "deliver": (18 * _HOUR, 72 * _HOUR),
    "confirm": (6 * _HOUR, 96 * _HOUR),
    "refund": (_HOUR, 48 * _HOUR),
}
# How long ago a new order was placed: room for a whole life before now.
_AGE_S = (14 * 24 * _HOUR, 21 * 24 * _HOUR)


_OUTCOMES = (
    RefundStatus.REFUNDED,
    RefundStatus.REFUNDED,
    RefundStatus.REJECTED,
    RefundStatus.CANCELLED,
)


def generate(world: World, rng: random.Random, orders: int, steps: int) -> list[WorldOrder]:
    """Create ``orders`` orders, then make up to ``steps`` random changes to each."""
    created = []
    for _ in range(orders):
        order = create_random_order(world, rng)
        for _ in range(steps):
            if not step(world, rng, order):
                break
        created.append(order)
    return created


def advance(world: World, rng: random.Random, changes: int) -> int:
    """Make up to ``changes`` random changes to random existing orders; returns how many."""
    made = 0
    for _ in range(changes):
        candidates = [o for o in world.orders() if _has_next(o)]
        if not candidates:
            break
        if step(world, rng, rng.choice(candidates)):
            made += 1
    return made


def create_random_order(world: World, rng: random.Random) -> WorldOrder:
    platform = rng.choice((Platform.TAOBAO, Platform.ALIBABA_1688))
    lines = [
        NewLine(
            title=rng.choice(_TITLES),
            quantity=rng.randint(1, 5),
            unit_price=Decimal(rng.randint(199, 29999)).scaleb(-2),
        )
        for _ in range(rng.randint(1, 3))
    ]
    shipping = Decimal(rng.choice((0, 500, 800, 1200))).scaleb(-2)
    now = world.now()
    ages = random.Random(f"placed:{len(world.orders())}:{now.isoformat()}")
    placed = now - timedelta(seconds=ages.randint(*_AGE_S))
    return world.create_order(platform, lines, shipping_fee=shipping, at=placed)


def _latest(order: WorldOrder) -> datetime:
    """When the last thing happened to ``order`` (in business time, not ``modified_at``)."""
    times = [order.created_at, order.paid_at, order.shipped_at, order.completed_at]
    times.append(order.cancelled_at)
    for shipment in order.shipments:
        times += [shipment.shipped_at, shipment.delivered_at, *(e.at for e in shipment.events)]
    for refund in order.refunds:
        times += [refund.requested_at, refund.resolved_at]
    return max(t for t in times if t is not None)


def _when(world: World, order: WorldOrder, kind: str) -> datetime:
    """When the next step of ``kind`` happens: a plausible while after the order's last one,
    and no later than now."""
    last = _latest(order)
    gaps = random.Random(f"{order.order_id}:{kind}:{last.isoformat()}")
    later = last + timedelta(seconds=gaps.randint(*_GAPS_S[kind]))
    return max(last, min(world.now(), later))


def _has_next(order: WorldOrder) -> bool:
    open_refund = any(r.status is RefundStatus.REQUESTED for r in order.refunds)
    return open_refund or order.status is not OrderStatus.CANCELLED


def step(world: World, rng: random.Random, order: WorldOrder) -> bool:
    """One random change allowed by the order's state; False when there is none."""
    requested = [r for r in order.refunds if r.status is RefundStatus.REQUESTED]
    if requested and rng.random() < 0.6:
        world.resolve_refund(requested[0], rng.choice(_OUTCOMES))
        return True
    status = order.status
    roll = rng.random()
    if status is OrderStatus.PENDING_PAYMENT:
        if roll < 0.7:
            world.pay(order, at=_when(world, order, "pay"))
        elif roll < 0.9:
            goods = order.total_amount - order.shipping_fee
            cut = (Decimal(rng.randint(1, 20)).scaleb(-2) * goods).quantize(Decimal("0.01"))
            world.change_price(order, total_amount=order.total_amount - cut)
        else:
            world.cancel(order, "buyerCancel", at=_when(world, order, "cancel"))
        return True
    if status is OrderStatus.PAID:
        if roll < 0.75:
            world.ship(order, at=_when(world, order, "ship"))
        elif roll < 0.9 and not requested:
            _refund(world, rng, order)
        else:
            world.cancel(order, "sellerCancel", at=_when(world, order, "cancel"))
        return True
    if status is OrderStatus.SHIPPED:
        undelivered = [s for s in order.shipments if s.delivered_at is None]
        if undelivered and roll < 0.45:
            trace_status, text, where = rng.choice(_TRACE)
            at = _when(world, order, "trace")
            world.add_event(
                order, undelivered[0].tracking_number, NewEvent(text, trace_status, where, at)
            )
        elif undelivered and roll < 0.75:
            world.deliver(order, at=_when(world, order, "deliver"))
        elif roll < 0.92 or requested:
            world.confirm(order, at=_when(world, order, "confirm"))
        else:
            _refund(world, rng, order)
        return True
    if status is OrderStatus.COMPLETED and not requested and roll < 0.2:
        return _refund(world, rng, order)
    if requested:
        world.resolve_refund(requested[0], rng.choice(_OUTCOMES))
        return True
    return False


def _refund(world: World, rng: random.Random, order: WorldOrder) -> bool:
    taken = sum(
        (
            r.amount
            for r in order.refunds
            if r.status in (RefundStatus.REQUESTED, RefundStatus.REFUNDED)
        ),
        Decimal("0.00"),
    )
    room = order.total_amount - taken
    if room <= 0:
        return False
    share = Decimal(rng.choice((25, 50, 100))).scaleb(-2)
    amount = max(Decimal("0.01"), (room * share).quantize(Decimal("0.01")))
    line = rng.choice(order.lines).line_id
    world.open_refund(order, amount, line_id=line, at=_when(world, order, "refund"))
    return True
