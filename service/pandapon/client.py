"""The thin PandaPon client the workers call: signed, rate-limited, timed, typed.

One ``httpx.AsyncClient`` per process is made by its owner (``make_http_client``, in a lifespan
or a worker's startup) and handed in; ``PandaPonClient`` never creates or closes it. Each call:

1. waits for a token from the shared rate limiter (``ratelimit.py``);
2. signs the request with the five headers (``signer.py``; docs/upstream.md, Requests);
3. sends it as the endpoint table says (``endpoints.py``), GET with a query, POST with JSON;
4. unwraps the envelope (``code == 200`` → ``data``) or raises the typed error of ``errors.py``;
5. maps ``data`` to the neutral snapshots (``mapping.py``).

Nothing is retried here: transport-level retries cover only failed connects (httpx), and 429/5xx
are retried deliberately by the worker, which knows its budget. The payment actions
(``pay_orders``, docs/upstream.md#payments) are made once, never retried by anyone: their callers
build the HTTP client with ``connect_retries=0`` and treat a call with no answer as an outcome
nobody knows (``workers/payments.py``). A 429's Retry-After is reported
on the error, so the worker delays that order; the shared limiter is told which order (or page)
was limited and pauses everyone only when the limit is clearly the account's
(``RateLimiter.note_limited``): one poisoned answer cannot stall the fleet.

Timeouts: httpx's per-call connect/read/write/pool timeouts, and, inside ``upstream_budget``
(one per reconcile), a total for the HTTP exchanges of the block; the wait for a rate-limit
token is not counted (it is our own pacing, and ends).

Metrics: ``pandasync_upstream_requests_total{endpoint,outcome}`` (one per call, ``outcome`` is
``ok`` or the error's ``outcome``) and ``pandasync_upstream_request_seconds{endpoint}`` (the HTTP
exchange only, not the wait for a token). Failures are logged with requestId, code and msg;
headers (so the signature) are never logged, and the secret is never held in anything logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import httpx
import structlog
from prometheus_client import Counter, Histogram

from service.accounts import Account
from service.config import ConfigError, Settings
from service.domain import PaymentState, Platform
from service.pandapon import mapping
from service.pandapon.endpoints import (
    TAOBAO_PAY_MAX_IDS,
    Endpoint,
    EndpointTable,
    Kind,
    ParamValue,
)
from service.pandapon.errors import (
    AUTH_CODES,
    RATE_LIMIT_CODE,
    AuthError,
    MalformedResponse,
    PandaPonError,
    UpstreamBudgetExceeded,
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from service.pandapon.models import (
    OrderListPage,
    OrderSnapshot,
    PaymentAnswer,
    PaymentResult,
    RefundListPage,
    RefundSnapshot,
    ShipmentSnapshot,
)
from service.pandapon.ratelimit import LocalTokenBucket, RateLimiter
from service.pandapon.signer import DEFAULT_SIGNER, Credentials, Signer, signed_headers

log = structlog.get_logger(__name__)

T = TypeVar("T")

UPSTREAM_REQUESTS = Counter(
    "pandasync_upstream_requests_total",
    "Calls to the PandaPon query APIs, by account, endpoint and outcome.",
    ["account", "endpoint", "outcome"],
)
UPSTREAM_SECONDS = Histogram(
    "pandasync_upstream_request_seconds",
    "Duration of the HTTP exchange with PandaPon (not the rate-limit wait).",
    ["account", "endpoint"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def make_http_client(settings: Settings, *, connect_retries: int = 1) -> httpx.AsyncClient:
    """The process's one upstream HTTP client: HTTP/1.1 keep-alive pool, explicit timeouts.

    Connect is short (a dead host should fail fast); read is the longest PandaPon may think;
    pool bounds the wait for a free connection when all ``http_max_connections`` are busy. The
    transport retries a failed connect ``connect_retries`` times (nothing was sent, so it is
    safe); a client that pays passes 0, so that no payment call is ever made twice.
    """
    limits = httpx.Limits(
        max_connections=settings.http_max_connections,
        max_keepalive_connections=settings.http_max_connections,
        keepalive_expiry=30.0,
    )
    transport = httpx.AsyncHTTPTransport(
        limits=limits, http1=True, http2=False, retries=connect_retries
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=settings.http_connect_timeout_s,
            read=settings.http_read_timeout_s,
            write=settings.http_write_timeout_s,
            pool=settings.http_pool_timeout_s,
        ),
        headers={"user-agent": "pandasync"},
        follow_redirects=False,
    )


def credentials_from(settings: Settings, account: Account | None = None) -> Credentials:
    """The credentials of ``account`` (default: the only account of ``settings``)."""
    account = account or settings.accounts()[0]
    if not account.has_credentials or account.access_secret is None:
        raise ConfigError(
            "PandaPon credentials are incomplete: set PANDASYNC_ACCESS_KEY, "
            "PANDASYNC_ACCESS_SECRET and PANDASYNC_USER_ID"
        )
    return Credentials(
        access_key=account.access_key or "",
        access_secret=account.access_secret.get_secret_value(),
        user_id=account.user_id or "",
    )


@dataclass(slots=True)
class UpstreamBudget:
    """Seconds of HTTP exchange with PandaPon that one unit of work (a reconcile) may spend."""

    seconds: float
    spent: float = 0.0

    @property
    def remaining(self) -> float:
        return self.seconds - self.spent

    @asynccontextmanager
    async def spend(self, endpoint: str) -> AsyncIterator[None]:
        """Run the block on what is left of the budget; UpstreamBudgetExceeded once it is out."""
        if self.remaining <= 0:
            raise _budget_exceeded(endpoint, self.seconds)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.remaining) as deadline:
                yield
        except TimeoutError:
            if deadline.expired():
                raise _budget_exceeded(endpoint, self.seconds) from None
            raise
        finally:
            self.spent += time.monotonic() - started


def _budget_exceeded(endpoint: str, seconds: float) -> UpstreamBudgetExceeded:
    return UpstreamBudgetExceeded(
        f"{endpoint}: the {seconds:g} s budget for upstream calls is spent", endpoint=endpoint
    )


_budget: ContextVar[UpstreamBudget | None] = ContextVar("pandasync_upstream_budget", default=None)


@contextmanager
def upstream_budget(seconds: float) -> Iterator[UpstreamBudget]:
    """Every call of the client made in this block (in this task) shares ``seconds``."""
    budget = UpstreamBudget(seconds)
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def current_budget() -> UpstreamBudget | None:
    """The budget of the enclosing ``upstream_budget`` block, if any."""
    return _budget.get()


@dataclass(frozen=True, slots=True)
class Envelope:
    """A successful response: ``data`` plus what identifies it in PandaPon's logs.

    ``answer`` is False only for an error envelope the call takes as an answer (``unwrap``'s
    ``answers``: 1688 logistics' "not shipped yet"); ``data`` is then what it carried.
    """

    data: Any
    request_id: str | None
    msg: str | None
    http_status: int
    answer: bool = True


# 1688's own logistics API answers error 500_2 ("not shipped yet, no logistics") for an order
# that has not shipped (docs/upstream.md#evidence [1688]): no parcels yet, not a failure.
# PandaPon may pass it on as the envelope's code ("500_2") or in its msg.
ALIBABA_NOT_SHIPPED_CODE = "500_2"


def alibaba_not_shipped_yet(envelope: Mapping[str, Any]) -> bool:
    """True when a 1688 logistics answer is the "not shipped yet" error (no parcels yet)."""
    code = envelope.get("code")
    if isinstance(code, str) and code.strip() == ALIBABA_NOT_SHIPPED_CODE:
        return True
    msg = envelope.get("msg")
    return isinstance(msg, str) and ALIBABA_NOT_SHIPPED_CODE in msg


class PandaPonClient:
    """The PandaPon query APIs as typed async methods; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        limiter: RateLimiter | None = None,
        signer: Signer = DEFAULT_SIGNER,
        credentials: Credentials | None = None,
        endpoints: EndpointTable | None = None,
        account: Account | None = None,
    ) -> None:
        """A client of ``account`` (default: the only account of ``settings``): its
        credentials, its base URL; ``limiter`` should be that account's
        (``make_rate_limiter(settings, account=...)``)."""
        self._http = http
        self.account = account or settings.accounts()[0]
        self._base_url = (self.account.api_base_url or settings.api_base_url).rstrip("/")
        self._unit = settings.timestamp_unit
        self._signer = signer
        self._credentials = credentials or credentials_from(settings, self.account)
        self.endpoints = endpoints or EndpointTable(settings.endpoint_overrides)
        self._limiter: RateLimiter = limiter or LocalTokenBucket(
            self.account.rate_limit_rps or settings.upstream_rate_limit_rps
        )

    def __repr__(self) -> str:
        return f"PandaPonClient({self._base_url!r}, user_id={self._credentials.user_id!r})"

    # --- what the workers call ------------------------------------------------------------

    async def order_detail(self, platform: Platform, order_id: str) -> OrderSnapshot:
        endpoint = self.endpoints.get(platform, "order_detail")
        return await self._call(
            endpoint,
            {"order_id": order_id},
            _data(partial(mapping.map_order, platform)),
            subject=f"{platform.value} order {order_id}",
        )

    async def logistics(self, platform: Platform, order: OrderSnapshot) -> list[ShipmentSnapshot]:
        """The parcels of ``order`` with their trace events.

        Taobao answers per sub-order: one call per line with the sub-order id
        (``subPurchaseOrderId`` / ``sub_purchase_order_id``, ``LineSnapshot.logistics_ref``),
        skipping lines whose detail says they have no logistics number yet and lines without a
        sub-order id (Taobao's own line number is not an id the call takes); a parcel that
        carries several lines comes back once (its ``line_id`` is then None). 1688 answers per
        order: one call; its "not shipped yet" error (``alibaba_not_shipped_yet``) is no parcels.
        """
        if order.platform is not platform:
            raise ValueError(f"order {order.order_id} is a {order.platform} order")
        endpoint = self.endpoints.get(platform, "logistics")
        if platform is Platform.ALIBABA_1688:
            return await self._call(
                endpoint,
                {"order_id": order.order_id},
                _alibaba_parcels,
                answers=alibaba_not_shipped_yet,
                subject=f"{platform.value} order {order.order_id}",
            )
        merged: dict[str, ShipmentSnapshot] = {}
        for line in order.lines:
            if line.has_tracking is False:
                continue
            ref = line.logistics_ref
            if ref is None:
                log.info(
                    "taobao sub-order without an id: logistics not asked",
                    order_id=order.order_id,
                    line_id=line.line_id,
                )
                continue
            parse = _data(partial(mapping.map_shipments, platform, line_id=line.line_id))
            subject = f"{platform.value} order {order.order_id}"
            for shipment in await self._call(
                endpoint, {"sub_order_id": ref}, parse, subject=subject
            ):
                seen = merged.get(shipment.tracking_number)
                merged[shipment.tracking_number] = (
                    shipment if seen is None else _merge_shipments(seen, shipment)
                )
        return list(merged.values())

    async def refund_detail(self, platform: Platform, refund_id: str) -> RefundSnapshot:
        endpoint = self.endpoints.get(platform, "refund_detail")
        return await self._call(
            endpoint,
            {"refund_id": refund_id},
            _data(partial(mapping.map_refund, platform)),
            subject=f"{platform.value} refund {refund_id}",
        )

    async def order_page(
        self,
        platform: Platform,
        page_no: int,
        page_size: int,
        modified_start: datetime,
        modified_end: datetime,
    ) -> OrderListPage:
        """One page of the orders modified in [start, end] (aware datetimes)."""
        parse = partial(mapping.map_order_page, platform, page_no=page_no, page_size=page_size)
        window = (modified_start, modified_end)
        return await self._page(platform, "order_list", page_no, page_size, window, parse)

    async def refund_page(
        self,
        platform: Platform,
        page_no: int,
        page_size: int,
        modified_start: datetime,
        modified_end: datetime,
    ) -> RefundListPage:
        """One page of the refunds (after-sales records) modified in [start, end]."""
        parse = partial(mapping.map_refund_page, platform, page_no=page_no, page_size=page_size)
        window = (modified_start, modified_end)
        return await self._page(platform, "refund_list", page_no, page_size, window, parse)

    async def fetch(self, endpoint_name: str, params: Mapping[str, ParamValue]) -> Envelope:
        """Any query endpoint of the table by name, unmapped (for tools and diagnosis).

        Never a payment action: a tool that looks must not pay (ValueError)."""
        endpoint = self.endpoints[endpoint_name]
        if endpoint.action:
            raise ValueError(f"{endpoint_name} is a payment action, not a query: not fetched")
        subject = f"{endpoint_name} {sorted(params.items())}"
        return await self._call(endpoint, params, _whole, subject=subject)

    # --- the payment actions (docs/upstream.md#payments): only `pandasync pay` calls these -----

    async def pay_orders(self, platform: Platform, order_ids: Sequence[str]) -> PaymentAnswer:
        """Pay the orders: ONE call, never retried; its answer per order.

        1688 pays one order per call (``GET /alibaba/order/pay/url``: password-free "protocol"
        payment); Taobao up to ``TAOBAO_PAY_MAX_IDS`` purchase ids per call. A refusal of the
        whole call raises the typed error of ``errors.py`` like any call; what each error means
        for the money (paid or not, or nobody knows) is the caller's to decide.
        """
        ids = [str(order_id) for order_id in order_ids]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError("pay_orders needs one or more distinct order ids")
        endpoint = self.endpoints.payment(platform)
        subject = f"{platform.value} payment of {', '.join(ids)}"
        if platform is Platform.ALIBABA_1688:
            if len(ids) != 1:
                raise ValueError("1688 pays one order per call")
            return await self._call(
                endpoint,
                {"order_id": ids[0]},
                partial(_payment_answer, platform, ids, alibaba_payment_results),
                subject=subject,
            )
        if len(ids) > TAOBAO_PAY_MAX_IDS:
            raise ValueError(f"Taobao pays at most {TAOBAO_PAY_MAX_IDS} orders per call")
        return await self._call(
            endpoint,
            {"order_ids": ids},
            partial(_payment_answer, platform, ids, taobao_payment_results),
            subject=subject,
        )

    # --- one call -------------------------------------------------------------------------

    async def _page(
        self,
        platform: Platform,
        kind: Kind,
        page_no: int,
        page_size: int,
        window: tuple[datetime, datetime],
        parse: Callable[[Any], T],
    ) -> T:
        """One page of a list endpoint (``kind``) over a modified-time window."""
        if page_no < 1 or page_size < 1:
            raise ValueError("page_no and page_size start at 1")
        params: dict[str, ParamValue] = {
            "page_no": page_no,
            "page_size": page_size,
            "modified_start": mapping.format_request_time(window[0]),
            "modified_end": mapping.format_request_time(window[1]),
        }
        subject = f"{platform.value} {kind} page {page_no}"
        return await self._call(
            self.endpoints.get(platform, kind), params, _data(parse), subject=subject
        )

    async def _call(
        self,
        endpoint: Endpoint,
        params: Mapping[str, ParamValue],
        parse: Callable[[Envelope], T],
        *,
        answers: Callable[[Mapping[str, Any]], bool] | None = None,
        subject: str,
    ) -> T:
        """One call; ``subject`` names what it is about (an order, a refund, a page), for the
        rate limiter to tell one order's limit from the account's."""
        outcome = "error"
        try:
            envelope = await self._exchange(endpoint, params, answers)
            try:
                result = parse(envelope)
            except MalformedResponse as error:
                raise MalformedResponse(
                    f"{endpoint.name}: {error.message}",
                    field=error.field,
                    endpoint=endpoint.name,
                    http_status=envelope.http_status,
                    request_id=envelope.request_id,
                    code=200,
                    msg=envelope.msg,
                ) from None
            outcome = "ok"
            return result
        except PandaPonError as error:
            outcome = error.outcome
            log.warning("pandapon call failed", error=error.log_message(), **error.context())
            if isinstance(error, UpstreamRateLimited):
                await self._limiter.note_limited(subject, error.retry_after)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            UPSTREAM_REQUESTS.labels(self.account.name, endpoint.name, outcome).inc()

    async def _exchange(
        self,
        endpoint: Endpoint,
        params: Mapping[str, ParamValue],
        answers: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> Envelope:
        wire = endpoint.wire_params(params)
        await self._limiter.acquire()
        headers = signed_headers(self._credentials, unit=self._unit, signer=self._signer)
        url = self._base_url + endpoint.path
        budget = current_budget()
        started = time.perf_counter()
        try:
            async with budget.spend(endpoint.name) if budget else nullcontext():
                if endpoint.method == "GET":
                    response = await self._http.get(url, params=wire, headers=headers)
                else:
                    response = await self._http.post(url, json=wire, headers=headers)
        except httpx.TimeoutException as error:
            raise UpstreamTimeout(
                f"{endpoint.name}: no answer in time ({type(error).__name__})",
                endpoint=endpoint.name,
            ) from error
        except httpx.TransportError as error:
            raise UpstreamConnectError(
                f"{endpoint.name}: connection failed ({type(error).__name__})",
                endpoint=endpoint.name,
            ) from error
        finally:
            UPSTREAM_SECONDS.labels(self.account.name, endpoint.name).observe(
                time.perf_counter() - started
            )
        return unwrap(endpoint.name, response, answers=answers)


def unwrap(
    endpoint: str,
    response: httpx.Response,
    *,
    answers: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Envelope:
    """The envelope (docs/upstream.md#response-envelope-and-errors) → Envelope, or the typed error.

    ``answers``: an error envelope (HTTP 2xx or 5xx) it says yes to is returned as an Envelope
    with ``answer=False`` instead of raised (a call that knows that error means "nothing yet").
    """
    status = response.status_code
    try:
        body = mapping.parse_json(response.content)
    except ValueError:
        body = None
    envelope = body if isinstance(body, dict) else {}
    request_id = _text(envelope.get("requestId"))
    msg = _text(envelope.get("msg"))
    code = _code(envelope.get("code"))
    context: dict[str, Any] = {
        "endpoint": endpoint,
        "http_status": status,
        "request_id": request_id,
        "code": code,
        "msg": msg,
    }
    if status == 429 or code == RATE_LIMIT_CODE:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise UpstreamRateLimited(
            f"{endpoint}: rate limited (retry after {retry_after} s)",
            retry_after=retry_after,
            **context,
        )
    if (
        answers is not None
        and (200 <= status < 300 or status >= 500)
        and code != 200
        and answers(envelope)
    ):
        data = envelope.get("data")
        return Envelope(data=data, request_id=request_id, msg=msg, http_status=status, answer=False)
    if status >= 500:
        raise UpstreamServerError(f"{endpoint}: HTTP {status}", **context)
    if status in (401, 403):
        raise AuthError(f"{endpoint}: credentials refused (HTTP {status}): {msg}", **context)
    if not 200 <= status < 300:
        raise UpstreamClientError(f"{endpoint}: HTTP {status}: {msg}", **context)
    if body is None:
        raise MalformedResponse(f"{endpoint}: the body is not JSON", **context)
    if not isinstance(body, dict):
        raise MalformedResponse(f"{endpoint}: the body is not an envelope", **context)
    if code is None:
        raise MalformedResponse(f"{endpoint}: the envelope has no code", field="code", **context)
    if code != 200:
        if code in AUTH_CODES:
            raise AuthError(f"{endpoint}: credentials refused (code {code}): {msg}", **context)
        if 500 <= code <= 599:
            raise UpstreamServerError(f"{endpoint}: code {code}: {msg}", **context)
        raise UpstreamRejected(f"{endpoint}: code {code}: {msg}", **context)
    return Envelope(data=body.get("data"), request_id=request_id, msg=msg, http_status=status)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None if absent or invalid."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def _data(parse: Callable[[Any], T]) -> Callable[[Envelope], T]:
    """A mapping of ``data`` as a parser of the whole envelope."""

    def parse_envelope(envelope: Envelope) -> T:
        return parse(envelope.data)

    return parse_envelope


def _whole(envelope: Envelope) -> Envelope:
    return envelope


def _alibaba_parcels(envelope: Envelope) -> list[ShipmentSnapshot]:
    """A 1688 logistics answer → its parcels; none when it is "not shipped yet"."""
    if not envelope.answer:
        return []
    return mapping.map_shipments(Platform.ALIBABA_1688, envelope.data)


# --- payment answers (docs/upstream.md#payments) --------------------------------------------------

PaymentResults = Callable[[Any, Sequence[str]], tuple[PaymentResult, ...]]


def _payment_answer(
    platform: Platform, ids: Sequence[str], results: PaymentResults, envelope: Envelope
) -> PaymentAnswer:
    return PaymentAnswer(
        platform=platform,
        results=results(envelope.data, ids),
        request_id=envelope.request_id,
        msg=envelope.msg,
        raw=mapping.jsonable(envelope.data),
    )


def _object(data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise MalformedResponse("the payment answer's data is not an object", field="data")
    return data


def _id_set(value: Any) -> set[str]:
    """Order ids from a list of numbers or strings (1688 sends integers)."""
    if not isinstance(value, list):
        return set()
    return {str(item) for item in value if isinstance(item, str | int) and str(item).strip()}


def _flag(value: Any) -> bool | None:
    """true / false as JSON, text or 0/1; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def alibaba_payment_results(data: Any, ids: Sequence[str]) -> tuple[PaymentResult, ...]:
    """The 1688 answer [doc, the seed page]: ``protocolPaySuccess`` true is paid; an order in
    ``cantPayOrderList`` was held back by quota or risk control; otherwise a ``payUrl`` is a
    link for paying by hand. An answer that says none of these is ``unknown``: nobody can tell
    from it whether money moved."""
    body = _object(data)
    (order_id,) = ids
    success = _flag(body.get("protocolPaySuccess"))
    pay_url = _text(body.get("payUrl")) or None
    if order_id in _id_set(body.get("cantPayOrderList")):
        reason = "quota or risk control kept it from being paid (cantPayOrderList)"
        return (PaymentResult(order_id, PaymentState.HELD_BACK, pay_url, reason),)
    if success is True:
        return (PaymentResult(order_id, PaymentState.PAID, pay_url),)
    if pay_url is not None:
        reason = "protocol pay failed: pay by hand at payUrl"
        return (PaymentResult(order_id, PaymentState.PAY_BY_HAND, pay_url, reason),)
    if success is False:
        reason = "protocol pay failed and no payUrl was given"
        return (PaymentResult(order_id, PaymentState.FAILED, None, reason),)
    reason = "the answer has no protocolPaySuccess, payUrl or cantPayOrderList"
    return (PaymentResult(order_id, PaymentState.UNKNOWN, None, reason),)


_TB_WILL_PAY = ("willPayPurchaseOrderIds", "will_pay_purchase_order_ids")
_TB_PAY_FAILURE = ("payFailurePurchaseOrderIds", "pay_failure_purchase_order_ids")
_TB_FAILED_RESULTS = ("payFailedResults", "pay_failed_results")
_TB_FAILED_ID = ("purchaseOrderId", "purchase_order_id")


def taobao_payment_results(data: Any, ids: Sequence[str]) -> tuple[PaymentResult, ...]:
    """The Taobao batch-pay answer [TG, DJ; PandaPon's own assumed]: an id in
    ``willPayPurchaseOrderIds`` was accepted for payment (``paid``); an id in
    ``payFailurePurchaseOrderIds`` or ``payFailedResults`` was not (``failed``, with its
    ``reason``); an id the answer does not name is ``unknown``. Either spelling is read."""
    body = _object(data)

    def first(names: tuple[str, ...]) -> Any:
        return next((body[name] for name in names if name in body), None)

    will_pay = _id_set(first(_TB_WILL_PAY))
    failed = dict.fromkeys(_id_set(first(_TB_PAY_FAILURE)), "payment failed")
    results = first(_TB_FAILED_RESULTS)
    for item in results if isinstance(results, list) else []:
        if not isinstance(item, Mapping):
            continue
        failed_id = next((item[n] for n in _TB_FAILED_ID if item.get(n) is not None), None)
        if failed_id is not None:
            failed[str(failed_id)] = _text(item.get("reason")) or "payment failed"
    answered: list[PaymentResult] = []
    for order_id in ids:
        if order_id in failed:
            answered.append(PaymentResult(order_id, PaymentState.FAILED, None, failed[order_id]))
        elif order_id in will_pay:
            answered.append(PaymentResult(order_id, PaymentState.PAID))
        else:
            reason = "the answer names it neither to be paid nor failed"
            answered.append(PaymentResult(order_id, PaymentState.UNKNOWN, None, reason))
    return tuple(answered)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)


def _code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    # ASCII digits only, and few of them: "²" and "፩" are digits to str.isdigit() but not to
    # int(), and int() of thousands of digits raises too.
    text = value.strip() if isinstance(value, str) else ""
    if text.isascii() and text.isdigit() and len(text) <= 9:
        return int(text)
    return None


def _merge_shipments(first: ShipmentSnapshot, second: ShipmentSnapshot) -> ShipmentSnapshot:
    """One parcel seen from two sub-orders: the union of its events, no single line."""
    events = {e.event_key: e for e in (*first.events, *second.events)}
    return replace(
        first,
        line_id=first.line_id if first.line_id == second.line_id else None,
        carrier=first.carrier or second.carrier,
        carrier_code=first.carrier_code or second.carrier_code,
        raw_status=first.raw_status or second.raw_status,
        delivered=first.delivered or second.delivered,
        events=mapping.sort_events(events.values()),
    )
