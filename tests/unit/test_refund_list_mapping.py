"""The refund lists: their endpoint entries, the client call, and ``map_refund_page``.

The records of a refund-list page are read by the same per-record mappers as the refund detail,
so each readable record must map exactly as ``map_refund`` maps it; a record they cannot read is
set aside with the ids it still shows (flat or nested, either spelling).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import ConfigError, load_settings
from service.ledger.models import Platform, RefundStatus
from service.pandapon import mapping
from service.pandapon.client import PandaPonClient
from service.pandapon.endpoints import DEFAULT_ENDPOINTS, EndpointTable
from service.pandapon.errors import MalformedResponse
from service.pandapon.models import UnreadableRefund

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688


def load(name: str) -> Any:
    return mapping.parse_json((FIXTURES / name).read_bytes())


# --- the endpoint table ---------------------------------------------------------------------------


def test_both_platforms_have_a_refund_list_paged_like_the_order_lists() -> None:
    table = EndpointTable()
    taobao, alibaba = table.get(TB, "refund_list"), table.get(AL, "refund_list")
    assert (taobao.name, taobao.method, taobao.path) == (
        "taobao_refund_list",
        "POST",
        "/open/order/refund/queryList",
    )
    assert (alibaba.name, alibaba.method, alibaba.path) == (
        "alibaba_refund_list",
        "POST",
        "/alibaba/refund/page",
    )
    for endpoint in (taobao, alibaba):
        assert dict(endpoint.params) == dict(table.get(endpoint.platform, "order_list").params)
        assert not endpoint.documented
    # [VN] shows Taobao's method and path; its paging and time filter are our guess.
    assert (taobao.method_source, taobao.path_source, taobao.params_source) == (
        "doc",
        "doc",
        "assumed",
    )
    assert {alibaba.method_source, alibaba.path_source, alibaba.params_source} == {"assumed"}


def test_refund_lists_are_overridable_by_name() -> None:
    table = EndpointTable(
        {
            "taobao_refund_list": {"path": "/open/refund/page", "modified_start": "startTime"},
            "alibaba_refund_list": {"method": "get", "page_size": "size"},
        }
    )
    taobao = table["taobao_refund_list"]
    assert taobao.path == "/open/refund/page"
    assert taobao.params["modified_start"] == "startTime"
    alibaba = table["alibaba_refund_list"]
    assert (alibaba.method, alibaba.params["page_size"]) == ("GET", "size")
    with pytest.raises(ConfigError, match="taobao_refund_list: unknown key 'refund_id'"):
        EndpointTable({"taobao_refund_list": {"refund_id": "refundId"}})
    assert set(DEFAULT_ENDPOINTS) >= {"taobao_refund_list", "alibaba_refund_list"}


# --- the client -----------------------------------------------------------------------------------


async def test_refund_page_posts_the_window_in_china_time_and_maps_the_page() -> None:
    fixtures = {
        "/open/order/refund/queryList": "taobao/refund_page__first.json",
        "/alibaba/refund/page": "1688/refund_page__first.json",
    }
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        data = json.loads((FIXTURES / fixtures[request.url.path]).read_text())
        return httpx.Response(200, json={"code": 200, "msg": "成功", "data": data})

    settings = load_settings(
        api_base_url="https://pandapon.test",
        access_key="ak",
        access_secret="secret",
        user_id="user",
        broker_url=None,
        endpoint_overrides={"alibaba_refund_list": {"modified_end": "endTime"}},
    )
    start = datetime(2026, 11, 24, 16, 0, tzinfo=UTC)
    end = datetime(2026, 11, 25, 16, 0, tzinfo=UTC)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        client = PandaPonClient(settings, http)
        taobao = await client.refund_page(TB, 1, 3, start, end)
        alibaba = await client.refund_page(AL, 2, 20, start, end)
        with pytest.raises(ValueError, match="start at 1"):
            await client.refund_page(TB, 0, 3, start, end)
    assert [(r.method, r.url.path) for r in seen] == [
        ("POST", "/open/order/refund/queryList"),
        ("POST", "/alibaba/refund/page"),
    ]
    assert json.loads(seen[0].content) == {
        "pageNo": 1,
        "pageSize": 3,
        "modifyStartTime": "2026-11-25 00:00:00",
        "modifyEndTime": "2026-11-26 00:00:00",
    }
    assert json.loads(seen[1].content)["endTime"] == "2026-11-26 00:00:00"
    assert (taobao.total, len(taobao.refunds), len(taobao.unreadable)) == (5, 2, 1)
    assert (alibaba.total, len(alibaba.refunds), len(alibaba.unreadable)) == (3, 2, 1)


# --- map_refund_page ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "name"),
    [(TB, "taobao/refund_page__first.json"), (AL, "1688/refund_page__first.json")],
)
def test_each_readable_record_maps_as_the_refund_detail_maps_it(
    platform: Platform, name: str
) -> None:
    data = load(name)
    page = mapping.map_refund_page(platform, data, page_no=9, page_size=9)
    assert (page.total, page.page_no, page.page_size) == (
        data["total"],
        data["pageNo"],
        data["pageSize"],
    )
    readable = data["records"][:2]
    assert page.refunds == tuple(mapping.map_refund(platform, r) for r in readable)
    assert [r.status for r in page.refunds] == [RefundStatus.REQUESTED, RefundStatus.REFUNDED]


def test_an_unreadable_taobao_record_shows_its_nested_ids() -> None:
    page = mapping.map_refund_page(TB, load("taobao/refund_page__first.json"), 1, 3)
    (odd,) = page.unreadable
    assert (odd.order_id, odd.refund_id) == ("3701122334455667799", "150012345678903")
    assert "records[2]" in odd.error


def test_an_unreadable_1688_record_shows_its_ids() -> None:
    page = mapping.map_refund_page(AL, load("1688/refund_page__first.json"), 1, 20)
    (odd,) = page.unreadable
    assert odd == UnreadableRefund("3350228510000445577", "2026112200000003", odd.error)
    assert "records[2].status" in odd.error


def test_a_record_with_no_ids_or_no_object_is_still_set_aside() -> None:
    records: list[Any] = ["not an object", {"refundStatus": "SUCCESS"}, {"refundId": True}]
    page = mapping.map_refund_page(TB, {"total": 3, "records": records}, 1, 50)
    assert page.refunds == ()
    assert [(r.order_id, r.refund_id) for r in page.unreadable] == [(None, None)] * 3
    assert "records[0]" in page.unreadable[0].error


def test_the_request_stands_in_for_absent_paging_fields() -> None:
    page = mapping.map_refund_page(AL, {"total": 0, "records": []}, page_no=4, page_size=25)
    assert (page.total, page.page_no, page.page_size, page.refunds) == (0, 4, 25, ())


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "data"),
        ({"records": []}, "total"),
        ({"total": "many", "records": []}, "total"),
        ({"total": 1}, "records"),
        ({"total": 1, "records": {}}, "records"),
    ],
)
def test_a_page_that_cannot_be_read_names_the_field(data: Any, field: str) -> None:
    with pytest.raises(MalformedResponse) as caught:
        mapping.map_refund_page(TB, data, 1, 50)
    assert caught.value.field == field
