"""The endpoint table: the query APIs (docs/upstream.md#endpoints) and the two payment actions
(docs/upstream.md#payments), in one place.

Each entry says how the request is made (method, path, the upstream names of its parameters)
and where each of those facts comes from: ``doc`` (a public PandaPon page), ``doc-v2`` (a v2
page) or ``assumed`` (our stand-in). A GET sends its parameters in the query string, a POST as a
JSON object, as the contract's table does.

Any entry can be changed without touching code through ``PANDASYNC_ENDPOINT_OVERRIDES``, a JSON
object keyed by endpoint name whose values may set ``method``, ``path`` and the upstream name of
any parameter by its logical name::

    {"taobao_order_detail": {"path": "/open/order/get", "order_id": "tid"},
     "alibaba_order_list": {"method": "GET"}}

An unknown endpoint, key or method is refused when the table is built (client construction, and
sandbox start), with a message naming it.

The payment endpoints (kind ``order_pay``) are actions, not queries: calling one pays an order.
They live beside the queries so that their paths are overridable like any other, but
``EndpointTable.all()`` and ``ENDPOINT_NAMES`` list the queries only (what ``pandasync doctor``
checks and a sync may call); ``EndpointTable.payments()`` and ``PAYMENT_ENDPOINT_NAMES`` list the
actions, which only ``pandasync pay`` calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from service.config import ConfigError
from service.domain import Platform

Method = Literal["GET", "POST"]
Source = Literal["doc", "doc-v2", "assumed"]
Kind = Literal["order_detail", "logistics", "order_list", "refund_detail", "refund_list"]
# An action: calling it changes something upstream (pays an order), so nothing calls it to look.
ActionKind = Literal["order_pay"]
# Taobao's pay call takes a list of purchase ids.
ParamValue = str | int | list[str]

KINDS: tuple[Kind, ...] = (
    "order_detail",
    "logistics",
    "order_list",
    "refund_detail",
    "refund_list",
)
ACTION_KINDS: tuple[ActionKind, ...] = ("order_pay",)
_PREFIX = {Platform.TAOBAO: "taobao", Platform.ALIBABA_1688: "alibaba"}
OVERRIDES_SETTING = "PANDASYNC_ENDPOINT_OVERRIDES"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    platform: Platform
    kind: Kind | ActionKind
    method: Method
    path: str
    # logical parameter name -> the name PandaPon expects
    params: Mapping[str, str]
    method_source: Source
    path_source: Source
    params_source: Source
    # logical parameter name -> a value always sent (1688's webSite)
    fixed: Mapping[str, str] = field(default_factory=dict)

    @property
    def documented(self) -> bool:
        """True when method, path and parameters are all on a public page."""
        return "assumed" not in (self.method_source, self.path_source, self.params_source)

    @property
    def action(self) -> bool:
        """True for an endpoint whose call changes something upstream (a payment)."""
        return self.kind in ACTION_KINDS

    def wire_params(self, values: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
        """The parameters under PandaPon's names; ``values`` are keyed by logical name."""
        unknown = set(values) - set(self.params)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}")
        wire: dict[str, ParamValue] = {}
        for logical, wire_name in self.params.items():
            if logical in self.fixed:
                wire[wire_name] = self.fixed[logical]
            elif logical in values:
                wire[wire_name] = values[logical]
            else:
                raise ValueError(f"{self.name}: missing parameter {logical!r}")
        return wire


def _ep(
    platform: Platform,
    kind: Kind | ActionKind,
    method: Method,
    path: str,
    params: dict[str, str],
    sources: tuple[Source, Source, Source],
    fixed: dict[str, str] | None = None,
) -> Endpoint:
    return Endpoint(
        name=endpoint_name(platform, kind),
        platform=platform,
        kind=kind,
        method=method,
        path=path,
        params=params,
        method_source=sources[0],
        path_source=sources[1],
        params_source=sources[2],
        fixed=fixed or {},
    )


def endpoint_name(platform: Platform, kind: Kind | ActionKind) -> str:
    return f"{_PREFIX[platform]}_{kind}"


_LIST_PARAMS = {
    "page_no": "pageNo",
    "page_size": "pageSize",
    "modified_start": "modifyStartTime",
    "modified_end": "modifyEndTime",
}
_TB, _AL = Platform.TAOBAO, Platform.ALIBABA_1688

DEFAULT_ENDPOINTS: Mapping[str, Endpoint] = {
    e.name: e
    for e in (
        _ep(
            _TB,
            "order_detail",
            "GET",
            "/open/order/detail/get",
            {"order_id": "orderId"},
            ("doc", "assumed", "assumed"),
        ),
        _ep(
            _TB,
            "logistics",
            "GET",
            "/open/order/logistics/detail/get",
            {"sub_order_id": "subPurchaseOrderId"},
            ("doc", "doc", "doc"),
        ),
        _ep(
            _TB,
            "order_list",
            "GET",
            "/open/order/page",
            dict(_LIST_PARAMS),
            ("doc", "assumed", "assumed"),
        ),
        _ep(
            _TB,
            "refund_detail",
            "GET",
            "/v2/taobao/order/refund/query",
            {"refund_id": "refundId"},
            ("doc-v2", "doc-v2", "doc-v2"),
        ),
        # [VN] (docs/upstream.md#evidence): the refund list page. Its documented filters
        # (purchaseOrderId, salesOrderId) are not what a sweep needs; paging and the
        # modified-time window are named as the order lists name them [assumed].
        _ep(
            _TB,
            "refund_list",
            "POST",
            "/open/order/refund/queryList",
            dict(_LIST_PARAMS),
            ("doc", "doc", "assumed"),
        ),
        _ep(
            _AL,
            "order_detail",
            "POST",
            "/alibaba/order/detail",
            {"web_site": "webSite", "order_id": "orderId"},
            ("doc", "doc", "doc"),
            fixed={"web_site": "1688"},
        ),
        _ep(
            _AL,
            "logistics",
            "GET",
            "/alibaba/order/logistics/trace",
            {"order_id": "orderId", "web_site": "webSite"},
            ("doc", "assumed", "assumed"),
            fixed={"web_site": "1688"},
        ),
        _ep(
            _AL,
            "order_list",
            "POST",
            "/v2/alibaba/order/page",
            dict(_LIST_PARAMS),
            ("doc-v2", "doc-v2", "assumed"),
        ),
        _ep(
            _AL,
            "refund_detail",
            "POST",
            "/alibaba/refund/info",
            {"refund_id": "refundId"},
            ("doc", "doc", "doc"),
        ),
        # Not public at all: a path in the style of the 1688 endpoints [assumed].
        _ep(
            _AL,
            "refund_list",
            "POST",
            "/alibaba/refund/page",
            dict(_LIST_PARAMS),
            ("assumed", "assumed", "assumed"),
        ),
    )
}
ENDPOINT_NAMES: tuple[str, ...] = tuple(DEFAULT_ENDPOINTS)

# Calling these pays (docs/upstream.md#payments). Never called by a sync or by doctor; only by
# `pandasync pay`.
PAYMENT_ENDPOINTS: Mapping[str, Endpoint] = {
    e.name: e
    for e in (
        # Taobao "Pay for the order": the method is documented, path and body are not
        # [assumed]; it takes up to TAOBAO_PAY_MAX_IDS purchase ids.
        _ep(
            _TB,
            "order_pay",
            "POST",
            "/open/order/pay",
            {"order_ids": "purchaseOrderIdList"},
            ("doc", "assumed", "assumed"),
        ),
        # The seed page: calling it tries password-free ("protocol") payment of the order.
        _ep(
            _AL,
            "order_pay",
            "GET",
            "/alibaba/order/pay/url",
            {"order_id": "orderId"},
            ("doc", "doc", "doc"),
        ),
    )
}
PAYMENT_ENDPOINT_NAMES: tuple[str, ...] = tuple(PAYMENT_ENDPOINTS)
TAOBAO_PAY_MAX_IDS = 10


class EndpointTable:
    """The endpoint table with the overrides applied; look up by name or (platform, kind)."""

    def __init__(self, overrides: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self._by_name = apply_overrides({**DEFAULT_ENDPOINTS, **PAYMENT_ENDPOINTS}, overrides or {})

    def __getitem__(self, name: str) -> Endpoint:
        return self._by_name[name]

    def all(self) -> tuple[Endpoint, ...]:
        """The query endpoints (never an action)."""
        return tuple(e for e in self._by_name.values() if not e.action)

    def payments(self) -> tuple[Endpoint, ...]:
        """The payment actions: calling one pays an order."""
        return tuple(e for e in self._by_name.values() if e.action)

    def get(self, platform: Platform, kind: Kind) -> Endpoint:
        return self._by_name[endpoint_name(platform, kind)]

    def payment(self, platform: Platform) -> Endpoint:
        return self._by_name[endpoint_name(platform, "order_pay")]


def apply_overrides(
    table: Mapping[str, Endpoint], overrides: Mapping[str, Mapping[str, str]]
) -> dict[str, Endpoint]:
    """``table`` with ``overrides`` applied; ConfigError naming any unknown or invalid entry."""
    result = dict(table)
    problems: list[str] = []
    for name, changes in overrides.items():
        if name not in table:
            problems.append(f"unknown endpoint {name!r} (known: {', '.join(table)})")
            continue
        endpoint = table[name]
        if not isinstance(changes, Mapping):
            problems.append(f"{name}: must be an object of settings")
            continue
        method: str = endpoint.method
        path = endpoint.path
        params = dict(endpoint.params)
        for key, value in changes.items():
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{name}.{key}: must be a non-empty string")
            elif key == "method":
                method = value.upper()
                if method not in ("GET", "POST"):
                    problems.append(f"{name}.method: must be GET or POST, not {value!r}")
            elif key == "path":
                path = value
                if not value.startswith("/"):
                    problems.append(f"{name}.path: must start with '/'")
            elif key in params:
                params[key] = value
            else:
                allowed = ", ".join(["method", "path", *endpoint.params])
                problems.append(f"{name}: unknown key {key!r} (allowed: {allowed})")
        if len(set(params.values())) != len(params):
            problems.append(f"{name}: two parameters share one upstream name")
        result[name] = replace(
            endpoint,
            method="POST" if method == "POST" else "GET",
            path=path,
            params=params,
        )
    if problems:
        raise ConfigError(f"{OVERRIDES_SETTING}: " + "; ".join(problems))
    return result
