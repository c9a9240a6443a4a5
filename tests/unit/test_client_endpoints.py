"""The endpoint table: the 10 query APIs, their provenance, and overrides refused when wrong."""

from __future__ import annotations

import httpx
import pytest

from service.config import ConfigError, load_settings
from service.ledger.models import Platform
from service.pandapon.client import PandaPonClient
from service.pandapon.endpoints import DEFAULT_ENDPOINTS, ENDPOINT_NAMES, EndpointTable


def test_the_table_has_the_ten_endpoints_of_the_contract() -> None:
    table = EndpointTable()
    rows = {(e.name, e.method, e.path, tuple(e.params.values())) for e in table.all()}
    assert rows == {
        ("taobao_order_detail", "GET", "/open/order/detail/get", ("orderId",)),
        ("taobao_logistics", "GET", "/open/order/logistics/detail/get", ("subPurchaseOrderId",)),
        (
            "taobao_order_list",
            "GET",
            "/open/order/page",
            ("pageNo", "pageSize", "modifyStartTime", "modifyEndTime"),
        ),
        ("taobao_refund_detail", "GET", "/v2/taobao/order/refund/query", ("refundId",)),
        (
            "taobao_refund_list",
            "POST",
            "/open/order/refund/queryList",
            ("pageNo", "pageSize", "modifyStartTime", "modifyEndTime"),
        ),
        ("alibaba_order_detail", "POST", "/alibaba/order/detail", ("webSite", "orderId")),
        ("alibaba_logistics", "GET", "/alibaba/order/logistics/trace", ("orderId", "webSite")),
        (
            "alibaba_order_list",
            "POST",
            "/v2/alibaba/order/page",
            ("pageNo", "pageSize", "modifyStartTime", "modifyEndTime"),
        ),
        ("alibaba_refund_detail", "POST", "/alibaba/refund/info", ("refundId",)),
        (
            "alibaba_refund_list",
            "POST",
            "/alibaba/refund/page",
            ("pageNo", "pageSize", "modifyStartTime", "modifyEndTime"),
        ),
    }
    assert len(ENDPOINT_NAMES) == 10
    for platform in Platform:
        for kind in ("order_detail", "logistics", "order_list", "refund_detail", "refund_list"):
            assert table.get(platform, kind).platform is platform  # type: ignore[arg-type]


def test_each_entry_says_what_is_documented_and_what_is_assumed() -> None:
    documented = {name for name, e in DEFAULT_ENDPOINTS.items() if e.documented}
    assert documented == {
        "taobao_logistics",
        "taobao_refund_detail",
        "alibaba_order_detail",
        "alibaba_refund_detail",
    }
    detail = DEFAULT_ENDPOINTS["taobao_order_detail"]
    assert (detail.method_source, detail.path_source, detail.params_source) == (
        "doc",
        "assumed",
        "assumed",
    )
    assert DEFAULT_ENDPOINTS["alibaba_order_list"].path_source == "doc-v2"


def test_overrides_change_method_path_and_parameter_names() -> None:
    table = EndpointTable(
        {
            "taobao_order_detail": {"path": "/open/order/get", "method": "post", "order_id": "tid"},
            "alibaba_logistics": {"web_site": "site"},
        }
    )
    detail = table["taobao_order_detail"]
    assert (detail.method, detail.path, dict(detail.params)) == (
        "POST",
        "/open/order/get",
        {"order_id": "tid"},
    )
    assert table["alibaba_logistics"].wire_params({"order_id": "9"}) == {
        "orderId": "9",
        "site": "1688",
    }
    assert table["taobao_logistics"] == DEFAULT_ENDPOINTS["taobao_logistics"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"taobao_order_details": {"path": "/x"}}, "unknown endpoint 'taobao_order_details'"),
        ({"taobao_order_detail": {"url": "/x"}}, "unknown key 'url'"),
        ({"taobao_order_detail": {"method": "PUT"}}, "must be GET or POST"),
        ({"taobao_order_detail": {"path": "open/x"}}, "must start with '/'"),
        ({"taobao_order_detail": {"path": ""}}, "non-empty string"),
        ({"taobao_order_list": {"page_no": "pageSize"}}, "share one upstream name"),
    ],
)
def test_wrong_overrides_are_a_clear_error(
    overrides: dict[str, dict[str, str]], message: str
) -> None:
    with pytest.raises(ConfigError, match="PANDASYNC_ENDPOINT_OVERRIDES") as caught:
        EndpointTable(overrides)
    assert message in str(caught.value)


async def test_client_construction_refuses_wrong_overrides() -> None:
    settings = load_settings(
        access_key="ak",
        access_secret="sk",
        user_id="u",
        endpoint_overrides={"alibaba_order_detail": {"orderID": "x"}},
    )
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match="unknown key 'orderID'"):
            PandaPonClient(settings, http)


def test_wire_params_need_every_parameter() -> None:
    endpoint = DEFAULT_ENDPOINTS["taobao_order_list"]
    with pytest.raises(ValueError, match="missing parameter 'modified_end'"):
        endpoint.wire_params({"page_no": 1, "page_size": 2, "modified_start": "x"})
    with pytest.raises(ValueError, match="unknown parameter"):
        endpoint.wire_params({"order_id": "1"})
