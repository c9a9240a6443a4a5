"""The upstream half of ``pandasync doctor``: the live PandaPon contract, read-only.

With the configured credentials, against ``PANDASYNC_API_BASE_URL``:

1. **credentials**: a one-row Taobao order list over the last day. Refused → the same with the
   other timestamp unit, since the docs' example (ms) and a public client (s) disagree
   (docs/upstream.md#evidence); the rest runs with the unit that worked.
2. **endpoints**: every entry of the endpoint table once, with ids the order lists gave (an
   order, a Taobao sub-order, a refund an order names) or, lacking one, a made-up id that looks
   real: a "not found" answer in an envelope proves method, path and parameters are accepted.
3. **shapes**: one real order per platform (detail, logistics once shipped, the refund it
   names) mapped by the real mapping, with ``mapping.record_missing`` listing every field it
   looked for and did not find; the fields the ledger cannot do without fail the check.

Only the table's query endpoints are called (never a payment action), nothing is written
anywhere, and every failure becomes a ``Check`` naming the setting to change: no exception
escapes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from service.config import Settings, TimestampUnit
from service.domain import OrderStatus, Platform, RefundStatus
from service.pandapon import mapping
from service.pandapon.client import PandaPonClient
from service.pandapon.endpoints import OVERRIDES_SETTING, Endpoint, EndpointTable, ParamValue
from service.pandapon.errors import (
    AuthError,
    MalformedResponse,
    PandaPonError,
    TransientError,
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamRejected,
)
from service.pandapon.models import OrderListPage, OrderSnapshot, RefundSnapshot, ShipmentSnapshot

from .report import (
    NAME_PLACEHOLDER,
    PATH_PLACEHOLDER,
    Check,
    Fix,
    Mark,
    OverrideFix,
    overrides_assignment,
)

PLATFORMS = (Platform.TAOBAO, Platform.ALIBABA_1688)
# Order lists are searched this many days back, the next only when the one before was empty.
LOOKBACK_DAYS = (30, 90)
LIST_PAGE_SIZE = 20
# Made-up ids shaped like real ones (a malformed id could be refused for its form, which
# would prove nothing about the request).
MADE_UP_IDS: Mapping[tuple[Platform, str], str] = {
    (Platform.TAOBAO, "order_id"): "3000000000000000001",
    (Platform.TAOBAO, "sub_order_id"): "2000000000001",
    (Platform.TAOBAO, "refund_id"): "100000000000000001",
    (Platform.ALIBABA_1688, "order_id"): "2000000000000000001",
    (Platform.ALIBABA_1688, "refund_id"): "TQ10000000000000001",
}
NOT_FOUND_WORDS = ("not found", "not exist", "no such", "不存在", "未找到", "找不到")
MISSING_WORDS = ("required", "missing", "empty", "不能为空", "必填", "缺少")
PAID_STATUSES = frozenset({OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.COMPLETED})
MAX_PATHS_SHOWN = 12


@dataclass(frozen=True, slots=True)
class OrderRef:
    """``--order PLATFORM:ID``: the order whose shapes to check."""

    platform: Platform
    order_id: str

    @classmethod
    def parse(cls, text: str) -> OrderRef:
        platform, sep, order_id = text.partition(":")
        if not sep or not order_id.strip():
            raise ValueError("expected PLATFORM:ID, e.g. taobao:3682557363260579405")
        try:
            return cls(Platform(platform.strip().lower()), order_id.strip())
        except ValueError:
            raise ValueError(f"unknown platform {platform!r}: taobao or 1688") from None


# --- 1. credentials -----------------------------------------------------------------------------


def other_unit(unit: TimestampUnit) -> TimestampUnit:
    return "s" if unit == "ms" else "ms"


async def _probe_credentials(
    settings: Settings, http: httpx.AsyncClient, now: datetime
) -> PandaPonError | None:
    """One small order-list call (Taobao, else 1688 when Taobao's list path is not there).

    None when PandaPon answered with an envelope, whatever its code: it checks the headers
    before the request, so any envelope but an auth refusal means the credentials passed.
    """
    client = PandaPonClient(settings, http)
    error: PandaPonError | None = None
    for platform in PLATFORMS:
        try:
            await client.order_page(platform, 1, 1, now - timedelta(days=1), now)
            return None
        except UpstreamRejected:
            return None
        except MalformedResponse as failed:
            # After a 200 envelope it is the mapping's problem, for the shapes checks.
            return None if failed.code == 200 else failed
        except UpstreamClientError as failed:
            error = failed
            if failed.http_status not in (404, 405):
                return failed
        except PandaPonError as failed:
            return failed
    return error


def _refusal(error: PandaPonError) -> str:
    parts = [f"HTTP {error.http_status}" if error.http_status else None]
    parts.append(f"code {error.code}" if error.code is not None else None)
    parts.append(error.msg)
    return ", ".join(p for p in parts if p)


async def check_credentials(
    settings: Settings, http: httpx.AsyncClient, now: datetime
) -> tuple[Check, Settings | None]:
    """The credentials check, and the settings to go on with (None: stop here)."""
    name = "credentials"
    unit = settings.timestamp_unit
    error = await _probe_credentials(settings, http, now)
    if error is None:
        return Check(Mark.OK, name, f"accepted (timestamp in {unit})"), settings
    if isinstance(error, AuthError):
        other = other_unit(unit)
        retried = settings.model_copy(update={"timestamp_unit": other})
        if await _probe_credentials(retried, http, now) is None:
            detail = (
                f"refused with the timestamp in {unit}, accepted in {other}: "
                f"set PANDASYNC_TIMESTAMP_UNIT={other}"
            )
            return Check(
                Mark.FAIL, name, detail, (Fix("PANDASYNC_TIMESTAMP_UNIT", other),)
            ), retried
        if error.http_status == 403 or error.code == 403:
            advice = "PANDASYNC_USER_ID is not allowed: check it"
        else:
            advice = (
                "check PANDASYNC_ACCESS_KEY, PANDASYNC_ACCESS_SECRET and PANDASYNC_USER_ID "
                "(and this host's clock)"
            )
        return Check(Mark.FAIL, name, f"refused ({_refusal(error)}): {advice}"), None
    base = settings.api_base_url
    if isinstance(error, UpstreamConnectError):
        detail = (
            f"cannot reach {base} ({error.message}): check PANDASYNC_API_BASE_URL and the network"
        )
        return Check(Mark.FAIL, name, detail), None
    if isinstance(error, TransientError):
        detail = f"not checked: {error.message}: try again later"
        return Check(Mark.UNKNOWN, name, detail), None
    if isinstance(error, UpstreamClientError):
        detail = f"not checked: no order list answered ({_refusal(error)}); see the endpoints"
        return Check(Mark.UNKNOWN, name, detail), settings
    detail = (
        f"{base} did not answer as PandaPon does ({error.message}): "
        "check PANDASYNC_API_BASE_URL (the API root)"
    )
    return Check(Mark.FAIL, name, detail), None


# --- 2. endpoints -------------------------------------------------------------------------------


def _overridden(endpoint: Endpoint, overrides: Mapping[str, Mapping[str, str]]) -> str:
    keys = list(overrides.get(endpoint.name, {}))
    return f" (overridden: {', '.join(keys)})" if keys else ""


def _says(msg: str | None, words: Iterable[str]) -> bool:
    text = (msg or "").lower()
    return any(word in text for word in words)


def _named_param(endpoint: Endpoint, msg: str | None) -> str | None:
    """The logical name of the parameter the message names, if it names one of ours."""
    text = (msg or "").lower()
    for logical, wire in endpoint.params.items():
        if logical not in endpoint.fixed and wire.lower() in text:
            return logical
    return None


def endpoint_check(
    endpoint: Endpoint,
    error: PandaPonError | None,
    *,
    overrides: Mapping[str, Mapping[str, str]],
    made_up: bool,
    seen: str = "",
) -> Check:
    """What one call says about method, path and parameters of ``endpoint``.

    ``made_up``: the call used a made-up id, so "not found" is the expected answer;
    ``seen``: what a successful call found, for the line.
    """
    where = f"{endpoint.method} {endpoint.path}{_overridden(endpoint, overrides)}"
    name = endpoint.name
    if error is None or (isinstance(error, MalformedResponse) and error.code == 200):
        # A mapping failure comes after a 200 envelope: the request was accepted.
        return Check(Mark.OK, name, f"{where}: accepted{seen}")
    if isinstance(error, UpstreamClientError) and error.http_status == 404:
        problem = "path not found (HTTP 404; the right path cannot be guessed from here)"
        return _override_check(where, problem, OverrideFix(name, "path", PATH_PLACEHOLDER))
    if isinstance(error, UpstreamClientError) and error.http_status == 405:
        method = "POST" if endpoint.method == "GET" else "GET"
        problem = "method not allowed (HTTP 405)"
        return _override_check(where, problem, OverrideFix(name, "method", method))
    if isinstance(error, TransientError):
        return Check(
            Mark.UNKNOWN, name, f"{where}: not checked: {_refusal(error) or error.message}"
        )
    if isinstance(error, AuthError):
        detail = (
            f"{where}: credentials refused here ({_refusal(error)}): PANDASYNC_USER_ID may "
            "lack permission for this API"
        )
        return Check(Mark.FAIL, name, detail)
    if isinstance(error, UpstreamRejected):
        return _rejected_check(endpoint, error, where, made_up=made_up)
    if isinstance(error, UpstreamClientError):
        return Check(Mark.FAIL, name, f"{where}: refused ({_refusal(error)})")
    detail = (
        f"{where}: answered without PandaPon's envelope ({error.message}): "
        "check PANDASYNC_API_BASE_URL"
    )
    return Check(Mark.FAIL, name, detail)


def _override_check(where: str, problem: str, fix: OverrideFix) -> Check:
    assignment = overrides_assignment({fix.endpoint: {fix.key: fix.value}})
    return Check(Mark.FAIL, fix.endpoint, f"{where}: {problem}: set {assignment}", (fix,))


def _rejected_check(
    endpoint: Endpoint, error: UpstreamRejected, where: str, *, made_up: bool
) -> Check:
    """An envelope with a code other than 200: a business answer to an accepted request,
    or a parameter PandaPon does not take."""
    name = endpoint.name
    answer = _refusal(error)
    not_found = error.code == 404 or _says(error.msg, NOT_FOUND_WORDS)
    if made_up and not_found:
        return Check(Mark.OK, name, f"{where}: accepted (a made-up id: {answer})")
    param = _named_param(endpoint, error.msg)
    if param is not None and (not made_up or _says(error.msg, MISSING_WORDS)):
        problem = f"parameter {endpoint.params[param]} not accepted ({answer})"
        return _override_check(where, problem, OverrideFix(name, param, NAME_PLACEHOLDER))
    if made_up:
        detail = f"{where}: not checked: a made-up id got {answer}: pass --order to use a real one"
        return Check(Mark.UNKNOWN, name, detail)
    keys = ", ".join(k for k in endpoint.params if k not in endpoint.fixed)
    if not_found:
        detail = (
            f"{where}: does not find it ({answer}): if the id is right, the parameter names "
            f"may be wrong (keys of {OVERRIDES_SETTING}.{name}: {keys})"
        )
    else:
        detail = f"{where}: refused ({answer}): check the parameters ({keys})"
    return Check(Mark.FAIL, name, detail)


def made_up_params(endpoint: Endpoint) -> dict[str, ParamValue]:
    return {
        logical: MADE_UP_IDS[(endpoint.platform, logical)]
        for logical in endpoint.params
        if logical not in endpoint.fixed
    }


# --- 3. shapes ----------------------------------------------------------------------------------


def shown_paths(paths: Iterable[str]) -> str:
    """Missing field paths, list indices folded (``subOrders[].quantity``), each once."""
    folded = list(dict.fromkeys(re.sub(r"\[\d+\]", "[]", path) for path in paths))
    more = len(folded) - MAX_PATHS_SHOWN
    shown = ", ".join(folded[:MAX_PATHS_SHOWN])
    return f"{shown}, and {more} more" if more > 0 else shown


def order_gaps(order: OrderSnapshot) -> list[str]:
    """What the ledger needs of an order and did not get."""
    gaps: list[str] = []
    if order.status is OrderStatus.UNKNOWN:
        gaps.append(f"status {order.raw_status!r} unknown")
    needed = (
        ("total_amount", order.total_amount),
        ("created_at", order.created_at),
        ("modified_at", order.modified_at),
    )
    gaps.extend(name for name, value in needed if value is None)
    if order.status in PAID_STATUSES and order.paid_at is None:
        gaps.append("paid_at")
    if not order.lines:
        gaps.append("lines")
    if any(line.quantity is None for line in order.lines):
        gaps.append("lines[].quantity")
    if any(line.amount is None for line in order.lines):
        gaps.append("lines[].amount")
    return gaps


def shipment_gaps(shipments: Sequence[ShipmentSnapshot]) -> list[str]:
    gaps: list[str] = []
    if any(not s.tracking_number for s in shipments):
        gaps.append("tracking_number")
    if any(not s.events for s in shipments):
        gaps.append("events")
    return gaps


def refund_gaps(refund: RefundSnapshot) -> list[str]:
    gaps: list[str] = []
    if refund.status is RefundStatus.UNKNOWN:
        gaps.append(f"status {refund.raw_status!r} unknown")
    if refund.amount is None:
        gaps.append("amount")
    return gaps


def shape_check(
    name: str, seen: str, gaps: Sequence[str], missing: Sequence[str], error: str | None = None
) -> Check:
    """✗ when the mapping failed or a needed field is missing; the fields the mapping looked
    for and did not find go on the ✗ line, or on a note under a ✓."""
    absent = f"not in the payload: {shown_paths(missing)}" if missing else ""
    if error is not None or gaps:
        problem = error or f"missing {', '.join(gaps)}"
        return Check(Mark.FAIL, name, "; ".join(p for p in (f"{seen}: {problem}", absent) if p))
    notes = (f"optional fields {absent}",) if absent else ()
    return Check(Mark.OK, name, f"{seen}: every needed field found", notes=notes)


# --- one platform -------------------------------------------------------------------------------


@dataclass
class _Found:
    """What the calls of one platform found, for the shapes checks."""

    page: OrderListPage | None = None
    page_missing: Sequence[str] = ()
    page_error: MalformedResponse | None = None
    days: int = LOOKBACK_DAYS[0]
    order_id: str | None = None
    order: OrderSnapshot | None = None
    order_missing: Sequence[str] = ()
    order_error: MalformedResponse | None = None
    shipments: list[ShipmentSnapshot] | None = None
    shipments_missing: Sequence[str] = ()
    shipments_error: MalformedResponse | None = None
    refund: RefundSnapshot | None = None
    refund_missing: Sequence[str] = ()
    refund_error: MalformedResponse | None = None


def _mapping_error(error: PandaPonError | None) -> MalformedResponse | None:
    if isinstance(error, MalformedResponse) and error.code == 200:
        return error
    return None


def _pick(page: OrderListPage | None) -> str | None:
    """The listed order that shows the most: one naming a refund, else shipped, else any."""
    if page is None:
        return None
    ranked = sorted(
        page.orders,
        key=lambda o: (
            not o.refund_ids,
            o.status not in (OrderStatus.SHIPPED, OrderStatus.COMPLETED),
        ),
    )
    if ranked:
        return ranked[0].order_id
    return next((r.order_id for r in page.unreadable if r.order_id), None)


def _shipped(order: OrderSnapshot) -> bool:
    return order.status in (OrderStatus.SHIPPED, OrderStatus.COMPLETED) or any(
        line.has_tracking or line.tracking_number for line in order.lines
    )


class PlatformChecks:
    """The endpoint and shape checks of one platform, in the order the calls are made."""

    def __init__(
        self, client: PandaPonClient, settings: Settings, platform: Platform, now: datetime
    ) -> None:
        self.client = client
        self.platform = platform
        self.now = now
        self.overrides = settings.endpoint_overrides
        self.found = _Found()

    def _check(
        self, endpoint: Endpoint, error: PandaPonError | None, *, made_up: bool, seen: str = ""
    ) -> Check:
        return endpoint_check(endpoint, error, overrides=self.overrides, made_up=made_up, seen=seen)

    async def _probe(
        self, endpoint: Endpoint, params: Mapping[str, ParamValue] | None = None, seen: str = ""
    ) -> Check:
        """An unmapped call where "not found" is a fine answer (made-up or not-yet-used ids)."""
        error: PandaPonError | None = None
        try:
            await self.client.fetch(endpoint.name, params or made_up_params(endpoint))
        except PandaPonError as failed:
            error = failed
        return self._check(endpoint, error, made_up=True, seen=seen)

    async def run(self, pinned: str | None) -> AsyncIterator[Check]:
        yield await self.order_list()
        self.found.order_id = pinned or _pick(self.found.page)
        yield await self.order_detail()
        yield await self.logistics()
        yield await self.refund_detail()
        yield await self.refund_list()

    async def order_list(self) -> Check:
        endpoint = self.client.endpoints.get(self.platform, "order_list")
        first_error: PandaPonError | None = None
        for n, days in enumerate(LOOKBACK_DAYS):
            start = self.now - timedelta(days=days)
            with mapping.record_missing() as missing:
                try:
                    page = await self.client.order_page(
                        self.platform, 1, LIST_PAGE_SIZE, start, self.now
                    )
                except PandaPonError as error:
                    if n == 0:
                        first_error = error
                        self.found.page_error = _mapping_error(error)
                        self.found.page_missing = missing
                    break  # a wider window may be refused for its length: keep what we have
            self.found.page, self.found.page_missing, self.found.days = page, missing, days
            if page.orders or page.unreadable:
                break
        listed = self.found.page
        seen = (
            f" ({listed.total} order(s) modified in the last {self.found.days} days)"
            if listed is not None
            else ""
        )
        return self._check(endpoint, first_error, made_up=False, seen=seen)

    async def order_detail(self) -> Check:
        endpoint = self.client.endpoints.get(self.platform, "order_detail")
        order_id = self.found.order_id
        if order_id is None:
            return await self._probe(endpoint)
        error: PandaPonError | None = None
        with mapping.record_missing() as missing:
            try:
                self.found.order = await self.client.order_detail(self.platform, order_id)
            except PandaPonError as failed:
                error = failed
        self.found.order_missing, self.found.order_error = missing, _mapping_error(error)
        return self._check(endpoint, error, made_up=False, seen=f" (order {order_id})")

    async def logistics(self) -> Check:
        endpoint = self.client.endpoints.get(self.platform, "logistics")
        order = self.found.order
        if order is None:
            return await self._probe(endpoint)
        fetchable = self.platform is Platform.ALIBABA_1688 or any(
            line.has_tracking is not False for line in order.lines
        )
        if _shipped(order) and fetchable:
            error: PandaPonError | None = None
            with mapping.record_missing() as missing:
                try:
                    self.found.shipments = await self.client.logistics(self.platform, order)
                except PandaPonError as failed:
                    error = failed
            self.found.shipments_missing = missing
            self.found.shipments_error = _mapping_error(error)
            seen = f" ({len(self.found.shipments or ())} parcel(s) of order {order.order_id})"
            return self._check(endpoint, error, made_up=False, seen=seen)
        # Not shipped yet: a real id still proves the request; "nothing there" is expected.
        seen = " (an order not shipped yet)"
        if self.platform is Platform.ALIBABA_1688:
            # Through the client's own call, which takes 1688's "not shipped yet" error (500_2)
            # as no parcels rather than as a failure.
            try:
                await self.client.logistics(self.platform, order)
            except PandaPonError as failed:
                return self._check(endpoint, failed, made_up=True, seen=seen)
            return self._check(endpoint, None, made_up=True, seen=seen)
        # The sub-order id is what the call takes; without one, a made-up id proves as much.
        ref = next((line.logistics_ref for line in order.lines if line.logistics_ref), None)
        if ref is None:
            return await self._probe(endpoint)
        params: dict[str, ParamValue] = {"sub_order_id": ref}
        return await self._probe(endpoint, params, seen=seen)

    async def refund_detail(self) -> Check:
        endpoint = self.client.endpoints.get(self.platform, "refund_detail")
        order = self.found.order
        if order is None or not order.refund_ids:
            return await self._probe(endpoint)
        refund_id = order.refund_ids[0]
        error: PandaPonError | None = None
        with mapping.record_missing() as missing:
            try:
                self.found.refund = await self.client.refund_detail(self.platform, refund_id)
            except PandaPonError as failed:
                error = failed
        self.found.refund_missing, self.found.refund_error = missing, _mapping_error(error)
        return self._check(endpoint, error, made_up=False, seen=f" (refund {refund_id})")

    async def refund_list(self) -> Check:
        """One page of the refunds modified over the window the order list was read in: a
        page, an empty one included, proves method, path and parameters."""
        endpoint = self.client.endpoints.get(self.platform, "refund_list")
        days = self.found.days
        start = self.now - timedelta(days=days)
        error: PandaPonError | None = None
        seen = ""
        try:
            page = await self.client.refund_page(self.platform, 1, LIST_PAGE_SIZE, start, self.now)
            seen = f" ({page.total} refund(s) modified in the last {days} days)"
        except PandaPonError as failed:
            error = failed
        return self._check(endpoint, error, made_up=False, seen=seen)

    def shapes(self) -> list[Check]:
        """The shape checks of what the calls found (after ``run``)."""
        found = self.found
        label = f"shapes {self.platform.value}"
        checks: list[Check] = []
        list_problem = _list_problem(found.page, found.page_error)
        if list_problem is not None:
            checks.append(
                shape_check(f"{label} list", "order list", [], found.page_missing, list_problem)
            )
        endpoints = self.client.endpoints
        if found.order_id is None:
            if checks:
                return checks
            if found.page is None:
                listing = endpoints.get(self.platform, "order_list").name
                detail = f"not checked: the order list did not answer (see {listing})"
            else:
                detail = (
                    f"no order found in the last {found.days} days to check shapes: "
                    f"pass --order {self.platform.value}:ID"
                )
            checks.append(Check(Mark.UNKNOWN, label, detail))
            return checks
        seen = f"order {found.order_id}"
        if found.order_error is not None or found.order is None:
            if found.order_error is None:
                fetch = endpoints.get(self.platform, "order_detail").name
                detail = f"{seen}: not checked: not fetched (see {fetch})"
                checks.append(Check(Mark.UNKNOWN, f"{label} order", detail))
            else:
                error = str(found.order_error)
                checks.append(shape_check(f"{label} order", seen, [], found.order_missing, error))
            return checks
        order = found.order
        checks.append(shape_check(f"{label} order", seen, order_gaps(order), found.order_missing))
        if found.shipments_error is not None or found.shipments:
            checks.append(
                shape_check(
                    f"{label} logistics",
                    seen,
                    shipment_gaps(found.shipments or []),
                    found.shipments_missing,
                    str(found.shipments_error) if found.shipments_error else None,
                )
            )
        if found.refund_error is not None or found.refund is not None:
            checks.append(
                shape_check(
                    f"{label} refund",
                    f"refund {order.refund_ids[0]}",
                    refund_gaps(found.refund) if found.refund is not None else [],
                    found.refund_missing,
                    str(found.refund_error) if found.refund_error else None,
                )
            )
        return checks


def _list_problem(page: OrderListPage | None, error: MalformedResponse | None) -> str | None:
    if error is not None:
        return str(error)
    if page is None or not page.unreadable:
        return None
    total = len(page.unreadable) + len(page.orders)
    return f"{len(page.unreadable)} of {total} record(s) unreadable: {page.unreadable[0].error}"


# --- all of it ----------------------------------------------------------------------------------


async def check_upstream(
    settings: Settings,
    http: httpx.AsyncClient,
    *,
    orders: Sequence[OrderRef] = (),
    now: datetime | None = None,
) -> AsyncIterator[Check]:
    """Every upstream check, each yielded as soon as it is known (the shapes come last)."""
    now = now or datetime.now(UTC)
    credentials, usable = await check_credentials(settings, http, now)
    yield credentials
    if usable is None:
        return
    client = PandaPonClient(usable, http, endpoints=EndpointTable(usable.endpoint_overrides))
    pinned = {ref.platform: ref.order_id for ref in orders}
    shapes: list[Check] = []
    for platform in PLATFORMS:
        checks = PlatformChecks(client, usable, platform, now)
        async for check in checks.run(pinned.get(platform)):
            yield check
        shapes.extend(checks.shapes())
    for check in shapes:
        yield check
