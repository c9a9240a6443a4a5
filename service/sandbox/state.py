"""What the sandbox's handlers share: the routing of the upstream side and its variant
(``SandboxState``, the host), and per account (``AccountWorld``) the world, faults, credentials,
the signature check of PandaPon's gateway and how the payment actions answer.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.config import ConfigError, TimestampUnit
from service.pandapon.endpoints import (
    ENDPOINT_NAMES,
    PAYMENT_ENDPOINT_NAMES,
    Endpoint,
    EndpointTable,
)
from service.pandapon.signer import (
    HEADER_ACCESS_KEY,
    HEADER_NONCE,
    HEADER_USER_ID,
    SIGNED_HEADERS,
    Credentials,
    check_signature,
)
from service.sandbox import render
from service.sandbox.delivery import CallbackDeliverer
from service.sandbox.settings import (
    ALL_ENDPOINTS,
    EndpointMove,
    FaultSpec,
    SandboxAccount,
    SandboxSettings,
    UpstreamVariant,
)
from service.sandbox.world import (
    Change,
    World,
)

log = structlog.get_logger(__name__)

MAX_PAGE_SIZE = 200
NONCE_MEMORY = 100_000

Fault = Literal["timeout", "rate_limit", "server_error", "huge_retry_after", "unstorable_error"]
Poison = Literal["far_future", "negative_amount"]
HUGE_RETRY_AFTER_S = 86_400
FAR_FUTURE = datetime(9999, 12, 30, tzinfo=UTC)  # a day short of the end: +08:00 must fit
M = TypeVar("M", bound=BaseModel)
D = TypeVar("D", bound=str)
# path -> method -> the endpoint served there
Routes = dict[str, dict[str, Endpoint]]
# The sandbox's words for each reason a signature check fails (what PandaPon's gateway says).
REFUSALS = {
    "wrong_access_key": "invalid access-key",
    "bad_timestamp": "invalid timestamp",
    "bad_nonce": "invalid nonce",
    "bad_signature": "signature mismatch",
    "stale_timestamp": "timestamp outside the allowed window",
    "future_timestamp": "timestamp outside the allowed window",
}
UNROUTED = "unrouted"  # the outcomes key of requests no endpoint takes

# How a payment call is answered (docs/sandbox.md, Payments): ``succeed`` pays the order;
# ``pay_url`` (1688: a link to pay by hand; Taobao: a failure naming it) and ``held_back``
# (1688: cantPayOrderList; Taobao: a failure) leave it unpaid; ``fail`` refuses the whole call
# (envelope code 400); ``hang`` answers nothing for ``hang_s``; ``hang_after_paying`` pays, then
# answers nothing (a payment whose answer is lost).
PayMode = Literal["succeed", "pay_url", "held_back", "fail", "hang", "hang_after_paying"]


class PaymentBehaviour(BaseModel):
    """How the sandbox answers the payment actions (``PUT /_sandbox/payments``)."""

    model_config = ConfigDict(extra="forbid")

    mode: PayMode = "succeed"
    # order id -> the mode for that order (overrides ``mode``)
    orders: dict[str, PayMode] = Field(default_factory=dict)
    # protocol payments that may succeed; once used up, the rest are held back (None: no quota)
    quota: int | None = Field(default=None, ge=0)
    # every payment call waits this long before it is handled
    delay_s: float = Field(default=0.0, ge=0, le=300)
    # how long ``hang`` answers nothing (or until the client gives up)
    hang_s: float = Field(default=30.0, gt=0, le=600)

    def mode_for(self, order_id: str) -> PayMode:
        return self.orders.get(order_id, self.mode)


def served_endpoints(table: EndpointTable, moves: Mapping[str, EndpointMove]) -> list[Endpoint]:
    """The table's endpoints where the sandbox serves them: each move applied."""
    served = []
    for endpoint in table.all():
        move = moves.get(endpoint.name)
        if move is not None:
            endpoint = replace(
                endpoint, path=move.path or endpoint.path, method=move.method or endpoint.method
            )
        served.append(endpoint)
    return served


def build_routes(endpoints: list[Endpoint], moved: Collection[str]) -> Routes:
    """The routing table; ValueError when a move lands on a route another endpoint has.

    Two endpoints the overrides alone put on one route keep the old rule: the first is served.
    """
    routes: Routes = {}
    for endpoint in endpoints:
        by_method = routes.setdefault(endpoint.path, {})
        taken = by_method.setdefault(endpoint.method, endpoint)
        if taken is not endpoint and (endpoint.name in moved or taken.name in moved):
            raise ValueError(
                f"endpoints: {taken.name} and {endpoint.name} would both be served at "
                f"{endpoint.method} {endpoint.path}"
            )
    return routes


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    msg: str


@dataclass
class AccountWorld:
    """One PandaPon account as the sandbox keeps it: its keys, its world of orders and refunds,
    its faults, payment behaviour, call counts and nonces, and its own callback deliverer
    (signed with its secret, to its URL). Requests and control calls pick one per request."""

    credentials: Credentials
    seed: int | str
    world: World
    deliverer: CallbackDeliverer
    initial_faults: dict[str, FaultSpec]
    faults: dict[str, FaultSpec]
    fault_rng: random.Random
    scenario_rng: random.Random
    calls: dict[str, Counter[str]] = field(default_factory=dict)
    nonces: OrderedDict[str, float] = field(default_factory=OrderedDict)
    payments: PaymentBehaviour = field(default_factory=PaymentBehaviour)
    # payment endpoint -> order id -> calls that named it; and -> outcome -> count
    payment_calls: dict[str, Counter[str]] = field(default_factory=dict)
    payment_outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    protocol_paid: int = 0  # payments made so far, counted against ``payments.quota``

    @classmethod
    def build(
        cls,
        account: SandboxAccount,
        settings: SandboxSettings,
        *,
        seed: int | str,
        record_ids: Iterator[int],
    ) -> AccountWorld:
        credentials = Credentials(
            access_key=account.access_key,
            access_secret=account.access_secret.get_secret_value(),
            user_id=account.user_id,
        )
        delivery = settings.delivery
        if account.callback_url is not None:
            delivery = delivery.model_copy(update={"webhook_url": account.callback_url})
        faults = dict(settings.faults)
        kept = cls(
            credentials=credentials,
            seed=seed,
            world=World(seed=seed),
            deliverer=CallbackDeliverer(
                delivery,
                credentials,
                unit=settings.timestamp_unit,
                seed=seed,
                record_ids=record_ids,
            ),
            initial_faults=faults,
            faults=dict(faults),
            fault_rng=random.Random(f"{seed}:faults"),
            scenario_rng=random.Random(f"{seed}:scenario"),
        )
        kept.reset_calls()
        kept.world.subscribe(kept.on_change)
        return kept

    @property
    def user_id(self) -> str:
        return self.credentials.user_id

    def reset_world(self) -> None:
        self.world = World(seed=self.seed)
        self.world.subscribe(self.on_change)

    def reset_calls(self) -> None:
        self.calls = {name: Counter() for name in ENDPOINT_NAMES}
        self.payment_calls = {name: Counter() for name in PAYMENT_ENDPOINT_NAMES}
        self.payment_outcomes = {name: Counter() for name in PAYMENT_ENDPOINT_NAMES}

    def reset_payments(self) -> None:
        """Payment behaviour back to the default (every payment succeeds), quota count too."""
        self.payments = PaymentBehaviour()
        self.protocol_paid = 0

    def reset_faults(self) -> None:
        self.faults = dict(self.initial_faults)

    def on_change(self, change: Change) -> None:
        settings = self.deliverer.settings
        message = render.callback_message(
            change.kind,
            change.order,
            change.refund,
            style=settings.callback_style,
            body_as_string=settings.body_as_string,
            timestamp_ms=int(time.time() * 1000),
        )
        self.deliverer.submit(message, change.order.platform.value, change.order.order_id)

    def fault_for(self, endpoint: str) -> FaultSpec:
        return self.faults.get(endpoint) or self.faults.get(ALL_ENDPOINTS) or FaultSpec()

    def draw_fault(self, spec: FaultSpec) -> Fault | None:
        shares: tuple[tuple[Fault, float], ...] = (
            ("timeout", spec.timeout),
            ("rate_limit", spec.rate_limit),
            ("server_error", spec.server_error),
            ("huge_retry_after", spec.huge_retry_after),
            ("unstorable_error", spec.unstorable_error),
        )
        return self._draw(shares)

    def draw_poison(self, spec: FaultSpec) -> Poison | None:
        shares: tuple[tuple[Poison, float], ...] = (
            ("far_future", spec.far_future),
            ("negative_amount", spec.negative_amount),
        )
        return self._draw(shares)

    def _draw(self, shares: Sequence[tuple[D, float]]) -> D | None:
        """One roll against cumulative shares; no roll when every share is zero (so a spec
        without faults leaves the fault stream where it was)."""
        if not any(share for _, share in shares):
            return None
        roll, edge = self.fault_rng.random(), 0.0
        for what, share in shares:
            edge += share
            if roll < edge:
                return what
        return None

    def verify(
        self, request: Request, *, unit: TimestampUnit, tolerance_s: float
    ) -> Refusal | None:
        """PandaPon's checks on the five headers (docs/upstream.md#requests-host-and-signing),
        against this account: all present, then the same signature check as our own
        receiver's (``signer.check_signature``) with this account's key and secret, then a
        fresh nonce and the user-id's permission (this account's user-id only)."""
        headers = {name: request.headers.get(name, "") for name in SIGNED_HEADERS}
        missing = [name for name, value in headers.items() if not value]
        if missing:
            return Refusal(401, f"missing header(s): {', '.join(missing)}")
        now = time.time()
        check = check_signature(
            headers,
            access_key=self.credentials.access_key,
            access_secret=self.credentials.access_secret,
            unit=unit,
            tolerance_s=tolerance_s,
            now=now,
        )
        if check.reason is not None:
            return Refusal(401, REFUSALS.get(check.reason, check.detail or check.reason))
        if self._nonce_seen(headers[HEADER_NONCE], now, tolerance_s):
            return Refusal(401, "nonce already used")
        if headers[HEADER_USER_ID] != self.credentials.user_id:
            return Refusal(403, "user-id has no permission")
        return None

    def _nonce_seen(self, nonce: str, now: float, window: float) -> bool:
        while self.nonces and (
            len(self.nonces) > NONCE_MEMORY or next(iter(self.nonces.values())) < now - window
        ):
            self.nonces.popitem(last=False)
        if nonce in self.nonces:
            return True
        self.nonces[nonce] = now
        return False


class UnknownAccount(Exception):
    """A control call named an account the sandbox does not serve."""


@dataclass
class SandboxState:
    """Everything the handlers share; lives on ``app.state.sandbox``: the host's routing and
    upstream variant, and the accounts it serves (``accounts``, by user-id, the first being the
    default of the control API)."""

    settings: SandboxSettings
    endpoints: EndpointTable
    accounts: dict[str, AccountWorld]
    upstream: UpstreamVariant = field(default_factory=UpstreamVariant)
    served: list[Endpoint] = field(default_factory=list)
    routes: Routes = field(default_factory=dict)
    # requests no endpoint took: counted for the host, as no account is known yet
    unrouted: Counter[str] = field(default_factory=Counter)
    by_access_key: dict[str, AccountWorld] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: SandboxSettings) -> SandboxState:
        record_ids = itertools.count(1)  # callback record ids unique across accounts
        accounts: dict[str, AccountWorld] = {}
        for index, account in enumerate(settings.account_list()):
            # The first account keeps the settings' seed, so one account runs as it always did.
            seed = settings.seed if index == 0 else f"{settings.seed}:{account.user_id}"
            accounts[account.user_id] = AccountWorld.build(
                account, settings, seed=seed, record_ids=record_ids
            )
        state = cls(
            settings=settings,
            endpoints=EndpointTable(settings.endpoint_overrides),
            accounts=accounts,
            by_access_key={a.credentials.access_key: a for a in accounts.values()},
        )
        try:
            state.set_upstream(settings.upstream)
        except ValueError as error:
            raise ConfigError(f"PANDASYNC_SANDBOX_UPSTREAM: {error}") from None
        return state

    @property
    def default(self) -> AccountWorld:
        """The first account: the one a control call without ``account`` addresses."""
        return next(iter(self.accounts.values()))

    def account(self, user_id: str | None) -> AccountWorld:
        """The account ``user_id`` names (None: the default one), or UnknownAccount."""
        if user_id is None:
            return self.default
        try:
            return self.accounts[user_id]
        except KeyError:
            known = ", ".join(self.accounts)
            raise UnknownAccount(
                f"no account with user_id {user_id!r} (accounts: {known})"
            ) from None

    def selected(self, user_id: str | None) -> list[AccountWorld]:
        """The account ``user_id`` names, or every account (None)."""
        return list(self.accounts.values()) if user_id is None else [self.account(user_id)]

    def account_of_request(self, request: Request) -> AccountWorld:
        """The account an upstream request is for: the one its ``access-key`` names, as
        PandaPon's gateway tells its accounts apart. A key no account has goes to the default
        account, whose check refuses it (``invalid access-key``), as a one-account host does."""
        return self.by_access_key.get(request.headers.get(HEADER_ACCESS_KEY, ""), self.default)

    @property
    def timestamp_unit(self) -> TimestampUnit:
        """The unit the upstream side accepts in a request's ``timestamp`` header."""
        return self.upstream.timestamp_unit or self.settings.timestamp_unit

    def verify(self, request: Request, account: AccountWorld) -> Refusal | None:
        """The gateway's checks of ``request`` against ``account`` (``AccountWorld.verify``)."""
        return account.verify(
            request, unit=self.timestamp_unit, tolerance_s=self.settings.signature_tolerance_s
        )

    def set_upstream(self, variant: UpstreamVariant) -> None:
        """Switch to ``variant``; ValueError (nothing changed) if its moves collide."""
        # The payment actions are served where the table has them (no variant moves them).
        served = [
            *served_endpoints(self.endpoints, variant.endpoints),
            *self.endpoints.payments(),
        ]
        self.routes = build_routes(served, variant.endpoints)
        self.served = served
        self.upstream = variant
        for account in self.accounts.values():
            account.deliverer.upstream_unit = self.timestamp_unit


def state_of(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


class BadRequest(Exception):
    """A parameter is missing or invalid (code 400 upstream, HTTP 400 on the control API)."""


class UpstreamAnswer(Exception):
    """An error envelope with the upstream's own code, e.g. 1688 logistics' ``500_2``."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def json_error(status: int, message: str) -> JSONResponse:
    """A control-API error, or a gateway refusal of the upstream side, as a small JSON body."""
    return JSONResponse({"error": message}, status_code=status)
