"""The sandbox's control API: the world refuses impossible changes, and seeds make runs repeat."""

from __future__ import annotations

import pytest

from service.sandbox.remote import SandboxControlError
from tests.support.servers import SandboxServer

pytest_plugins = ["tests.support.sandbox"]


async def test_impossible_changes_are_refused_with_a_reason(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    order_id = (await remote.create_order("taobao"))["order_id"]
    await remote.pay("taobao", order_id)
    cases = [
        (remote.pay("taobao", order_id), 409, "it is paid"),
        (remote.change_price("taobao", order_id, total_amount="1"), 409, "change the price"),
        (remote.confirm("taobao", order_id), 409, "cannot confirm"),
        (remote.open_refund("taobao", order_id, "1000"), 400, "at most 100.00"),
        (remote.pay("taobao", "1"), 404, "no taobao order 1"),
        (remote.resolve_refund("1688", "TQ1", "refunded"), 404, "no 1688 refund TQ1"),
    ]
    for call, status, reason in cases:
        with pytest.raises(SandboxControlError) as caught:
            await call
        assert caught.value.status == status
        assert reason in caught.value.reason


async def test_bodies_are_validated(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    with pytest.raises(SandboxControlError) as caught:
        await remote.create_order("taobao", [{"title": "x", "quantity": 0, "unit_price": "1"}])
    assert caught.value.status == 400
    assert "quantity" in caught.value.reason
    with pytest.raises(SandboxControlError) as caught:
        await remote.set_faults({"taobao_orders": {"server_error": 1.0}})
    assert caught.value.status == 400
    assert "unknown endpoint" in caught.value.reason
    with pytest.raises(SandboxControlError) as caught:
        await remote.set_faults({"*": {"server_error": 2.0}})
    assert caught.value.status == 400
    with pytest.raises(SandboxControlError) as caught:
        await remote.configure_delivery(drop=-1)
    assert caught.value.status == 400


async def test_a_full_refund_closes_a_paid_order(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    truth = await remote.create_order("1688", shipping_fee="5")
    order_id = truth["order_id"]
    await remote.pay("1688", order_id)
    refund = await remote.open_refund("1688", order_id, truth["total_amount"])
    await remote.resolve_refund("1688", refund["refund_id"], "refunded")
    after = await remote.order("1688", order_id)
    assert (after["status"], after["close_reason"]) == ("cancelled", "refunded")
    assert after["refunded_amount"] == truth["total_amount"]
    modified = [after["created_at"], after["paid_at"], after["modified_at"]]
    assert modified == sorted(set(modified))  # every change moved modified_at forward


async def test_a_seed_repeats_the_same_world(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    runs = []
    for _ in range(2):
        await remote.reset()
        await remote.scenario(orders=20, steps=6, seed=11)
        orders = await remote.orders()
        runs.append(
            [
                (o["order_id"], o["status"], o["total_amount"], [r["status"] for r in o["refunds"]])
                for o in orders
            ]
        )
    assert runs[0] == runs[1]
    assert len({status for _, status, _, _ in runs[0]}) >= 3


async def test_reset_empties_the_world_and_the_counts(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    await remote.scenario(orders=3)
    await remote.set_faults({"*": {"latency_s": 0.01}})
    await remote.reset()
    assert await remote.orders() == []
    assert set((await remote.calls()).values()) == {0}
