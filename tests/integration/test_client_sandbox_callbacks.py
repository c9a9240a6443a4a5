"""The sandbox's callbacks reach a webhook as PandaPon's would: shapes, signatures, retries and
the seeded misbehaviour (drop, duplicate, reorder, delay)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from service.pandapon.signer import SIGNED_HEADERS, signature_matches, timestamp_to_seconds
from tests.support.servers import Received, RecordingReceiver, SandboxServer, serve_in_thread

pytest_plugins = ["tests.support.sandbox"]

STATUS_TB = "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE"
PRICE_TB = "TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY"
REFUND_TB = "TAOBAO_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND"


@dataclass
class Hook:
    receiver: RecordingReceiver
    url: str

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.receiver.snapshot()]


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = RecordingReceiver()
    with serve_in_thread(receiver.app()) as base:
        yield Hook(receiver, f"{base}/webhooks/pandapon")


@pytest.fixture
async def sandbox(sandbox_server: SandboxServer, hook: Hook) -> SandboxServer:
    """The sandbox delivering to ``hook``, one message at a time so the order is predictable."""
    await sandbox_server.remote.configure_delivery(webhook_url=hook.url, concurrency=1)
    return sandbox_server


def assert_signed_by(received: Received, server: SandboxServer) -> None:
    headers = received.headers
    assert all(headers.get(name) for name in SIGNED_HEADERS)
    assert headers["access-key"] == server.settings.access_key
    assert headers["user-id"] == server.settings.user_id
    assert headers["content-type"] == "application/json"
    secret = server.settings.access_secret.get_secret_value()
    assert signature_matches(
        secret,
        headers["access-key"],
        headers["timestamp"],
        headers["nonce-str"],
        headers["signature"],
    )
    assert timestamp_to_seconds(headers["timestamp"], "ms") > 1.7e9


async def test_taobao_changes_send_the_documented_bodies(
    sandbox: SandboxServer, hook: Hook
) -> None:
    remote = sandbox.remote
    truth = await remote.create_order("taobao", shipping_fee="5")
    order_id = truth["order_id"]
    await remote.change_price("taobao", order_id, total_amount="99.50")
    await remote.pay("taobao", order_id)
    tracking = await remote.ship("taobao", order_id)
    await remote.add_event("taobao", order_id, tracking, "运输中", status="TRANSPORT")
    await remote.deliver("taobao", order_id)  # logistics move without a message
    await remote.confirm("taobao", order_id)
    refund = await remote.open_refund("taobao", order_id, "10")
    await remote.resolve_refund("taobao", refund["refund_id"], "rejected")
    assert (await remote.drain())["drained"] is True

    messages = hook.messages()
    assert [m["messageType"] for m in messages] == [
        STATUS_TB,  # created
        PRICE_TB,
        STATUS_TB,  # paid
        STATUS_TB,  # shipped
        STATUS_TB,  # confirmed
        REFUND_TB,  # opened
        REFUND_TB,  # rejected
    ]
    for received in hook.receiver.snapshot():
        assert_signed_by(received, sandbox)
    for message in messages:
        assert message["messagePlatform"] == 0
        assert message["timestamp"].isdigit()
        assert len(message["timestamp"]) == 13
        body = message["messageBody"]
        assert body["salesOrderId"] == order_id
        (sub,) = body["subOrders"]
        assert set(sub) == {
            "purchase_order_outer_id",
            "purchase_order_line_outer_id",
            "close_time_without_payment",
            "detail_error_code",
            "product_amount",
            "logistic_company_name",
            "logistic_number",
            "quantity",
        }
    price = messages[1]["messageBody"]["purchaseOrderPriceDTO"]
    assert price == {
        "purchaseCurrency": "CNY",
        "purchaseTotalFee": 9950,
        "purchaseProductFee": 9450,
        "purchaseShippingFee": 500,
    }
    assert messages[3]["messageBody"]["subOrders"][0]["logistic_number"] == tracking
    assert messages[5]["messageBody"]["refundStatus"] == "WAIT_SELLER_AGREE"
    assert messages[6]["messageBody"]["refundStatus"] == "SELLER_REFUSE_BUYER"
    assert messages[6]["messageBody"]["refundId"] == refund["refund_id"]
    records = (await remote.callbacks())["records"]
    assert {r["state"] for r in records} == {"delivered"}
    assert {r["attempts"] for r in records} == {1}


async def test_1688_bodies_have_the_shape_of_the_order_detail(
    sandbox: SandboxServer, hook: Hook
) -> None:
    remote = sandbox.remote
    truth = await remote.create_order("1688")
    order_id = truth["order_id"]
    await remote.pay("1688", order_id)
    refund = await remote.open_refund("1688", order_id, "30")
    await remote.drain()

    created, paid, refunded = hook.messages()
    assert [m["messageType"] for m in (created, paid, refunded)] == [
        "1688_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
        "1688_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
        "1688_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
    ]
    assert {m["messagePlatform"] for m in (created, paid, refunded)} == {1}
    for message in (created, paid, refunded):
        assert {"baseInfo", "productItems", "nativeLogistics", "tradeTerms"} <= set(
            message["messageBody"]
        )
        assert message["messageBody"]["baseInfo"]["idOfStr"] == order_id
    assert paid["messageBody"]["baseInfo"]["status"] == "waitsellersend"
    assert paid["messageBody"]["baseInfo"]["totalAmount"] == 100.0  # yuan
    assert refunded["messageBody"]["refundId"] == refund["refund_id"]


async def test_flat_bodies_as_strings_like_the_white_label_copy(
    sandbox: SandboxServer, hook: Hook
) -> None:
    remote = sandbox.remote
    await remote.configure_delivery(callback_style="flat", body_as_string=True)
    order_id = (await remote.create_order("1688", shipping_fee="5"))["order_id"]
    await remote.pay("1688", order_id)
    await remote.ship("1688", order_id)
    second = (await remote.create_order("taobao"))["order_id"]
    await remote.cancel("taobao", second, "buyerCancel")
    await remote.drain()

    messages = hook.messages()
    assert [m["messageType"] for m in messages] == [
        "ORDER_CREATE",
        "ORDER_PAY_SUCCESS",
        "ORDER_STATUS_CHANGE",
        "ORDER_CREATE",
        "ORDER_CANCEL",
    ]
    assert all(isinstance(m["messageBody"], str) for m in messages)
    paid = json.loads(messages[1]["messageBody"])
    assert paid["orderId"] == order_id
    assert (paid["totalAmount"], paid["shippingFee"], paid["productAmount"]) == (10500, 500, 10000)
    assert paid["payStatus"] == 1
    assert paid["orderStatus"] == "waitsellersend"
    cancelled = json.loads(messages[4]["messageBody"])
    assert (cancelled["orderStatus"], cancelled["closeReason"]) == ("TRADE_CLOSED", "buyerCancel")


async def test_deliveries_without_a_200_are_retried(sandbox: SandboxServer, hook: Hook) -> None:
    hook.receiver.statuses.extend([500, 503])
    await sandbox.remote.create_order("taobao")
    await sandbox.remote.drain()
    received = hook.receiver.snapshot()
    assert len(received) == 3
    assert len({r.body for r in received}) == 1
    assert len({r.headers["nonce-str"] for r in received}) == 3  # each attempt signed afresh
    (record,) = (await sandbox.remote.callbacks())["records"]
    assert (record["state"], record["attempts"], record["last_status"]) == ("delivered", 3, 200)


async def test_delivery_gives_up_after_max_retries(sandbox: SandboxServer, hook: Hook) -> None:
    hook.receiver.default_status = 503
    await sandbox.remote.configure_delivery(max_retries=5)
    await sandbox.remote.create_order("1688")
    await sandbox.remote.drain()
    assert len(hook.receiver.snapshot()) == 6  # the first try and 5 retries, like PandaPon
    stats = await sandbox.remote.callbacks()
    (record,) = stats["records"]
    assert (record["state"], record["attempts"], record["last_status"]) == ("failed", 6, 503)
    assert stats["states"] == {"failed": 1}


async def test_dropped_messages_never_arrive(sandbox: SandboxServer, hook: Hook) -> None:
    await sandbox.remote.configure_delivery(drop=1.0)
    order_id = (await sandbox.remote.create_order("taobao"))["order_id"]
    await sandbox.remote.pay("taobao", order_id)
    await sandbox.remote.drain()
    assert hook.receiver.snapshot() == []
    assert (await sandbox.remote.callbacks())["states"] == {"dropped": 2}


async def test_duplicated_messages_arrive_twice(sandbox: SandboxServer, hook: Hook) -> None:
    await sandbox.remote.configure_delivery(duplicate=1.0)
    await sandbox.remote.create_order("taobao")
    await sandbox.remote.drain()
    first, second = hook.receiver.snapshot()
    assert first.body == second.body
    records = (await sandbox.remote.callbacks())["records"]
    assert [r["duplicate_of"] for r in records] == [None, records[0]["id"]]


async def test_reordered_messages_arrive_after_the_next_one(
    sandbox: SandboxServer, hook: Hook
) -> None:
    await sandbox.remote.configure_delivery(reorder=1.0, reorder_hold_s=30.0)
    order_id = (await sandbox.remote.create_order("taobao"))["order_id"]
    await sandbox.remote.pay("taobao", order_id)
    await sandbox.remote.drain()
    records = {r["id"]: r for r in (await sandbox.remote.callbacks(with_body=True))["records"]}
    arrived = [json.loads(r.body) for r in hook.receiver.snapshot()]
    sent = [records[1]["message"], records[2]["message"]]
    assert arrived == [sent[1], sent[0]]  # the create came after the pay
    assert records[1]["held"] is True


async def test_delayed_messages_still_arrive(sandbox: SandboxServer, hook: Hook) -> None:
    await sandbox.remote.configure_delivery(delay=1.0, delay_s=0.1)
    await sandbox.remote.create_order("1688")
    await sandbox.remote.drain()
    assert len(hook.receiver.snapshot()) == 1
    (record,) = (await sandbox.remote.callbacks())["records"]
    assert (record["delayed"], record["state"]) == (True, "delivered")


async def test_no_webhook_url_means_nothing_is_sent(sandbox_server: SandboxServer) -> None:
    await sandbox_server.remote.create_order("taobao")
    stats = await sandbox_server.remote.callbacks()
    assert stats["states"] == {"no_target": 1}
