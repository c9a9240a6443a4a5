"""The console's pages and forms, under ``/console``.

Without ``PANDASYNC_ADMIN_TOKEN`` (or with one under MIN_TOKEN_CHARS) every console path
answers 404 with a page saying how to turn the console on. With it, a page without a valid
session redirects to the login form (a POST without one gets 401), and a POST whose CSRF token
or Origin does not match is refused with 403 before it changes anything.

The console shares the web process's database pool with the webhook receiver: at most
DB_CONCURRENCY console requests use it at a time, so an operator clicking around cannot take
the connections a callback needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import dramatiq
import jinja2
import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.templating import Jinja2Templates

from service.broker import enqueue_replays
from service.config import Settings
from service.console import charts, queries, views
from service.console.auth import (
    LOGIN_COOKIE,
    LOGIN_MAX_AGE_S,
    MIN_TOKEN_CHARS,
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    FormTooLarge,
    Keys,
    Session,
    clear_cookie,
    csrf_valid,
    local_target,
    read_form,
    same_origin,
    set_cookie,
)
from service.db import session_scope
from service.domain import InboxState, OrderStatus, Platform, SignatureState
from service.ledger import outbound
from service.ledger.failures import (
    AlreadyClosed,
    ClosedMeanwhile,
    DismissRefused,
    NoSuchFailure,
    dismiss_failures,
    list_open,
    mark_replayed,
    open_failures,
    replay_orders,
)
from service.ledger.timeline import at, describe, failure_text, find_orders, money, order_timeline

log = structlog.get_logger("pandasync.console")

TEMPLATES = Path(__file__).parent / "templates"
DB_CONCURRENCY = 2
MAX_PARAM_CHARS = 128
DEFAULT_HOURS = 3
DISMISSED_BY_DEFAULT = "console"

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make a form POST's Origin null
    "cache-control": "no-store",
}

Handler = Callable[[Request], Awaitable[Response]]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(at=at, age=views.age, money=money, plain=views.plain)
    return env


class BadInput(Exception):
    """A query parameter or form field the console cannot use; the message says which."""


def _param(request: Request, name: str, choices: tuple[str, ...] | None = None) -> str | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    if len(value) > MAX_PARAM_CHARS:
        raise BadInput(f"{name} is longer than {MAX_PARAM_CHARS} characters")
    if choices is not None and value not in choices:
        raise BadInput(f"{name} must be one of: {', '.join(choices)}")
    return value


def _int_param(request: Request, name: str) -> int | None:
    value = _param(request, name)
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) < 2**63:
        raise BadInput(f"{name} must be a positive whole number")
    return int(value)


PLATFORMS = tuple(p.value for p in Platform)
STATUSES = tuple(s.value for s in OrderStatus)
STATES = tuple(s.value for s in InboxState)
SIGNATURES = (*(s.value for s in SignatureState), queries.SIGNATURE_UNCHECKED)


class Console:
    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.templates = Jinja2Templates(env=_environment())
        self._db_slots: asyncio.Semaphore | None = None

    # --- plumbing ---------------------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("session", None)
        context.setdefault("nav", None)
        response = self.templates.TemplateResponse(
            request, name, context, status_code=status, headers=SECURITY_HEADERS
        )
        return response

    def error(
        self, request: Request, status: int, message: str, session: Session | None
    ) -> Response:
        return self.render(request, "error.html", status, message=message, session=session)

    def unavailable(self, request: Request, error: Exception, session: Session) -> Response:
        """The database failed or was too slow: one line, and the details in the log."""
        log.warning("console.database_error", path=request.url.path, error=type(error).__name__)
        return self.error(
            request,
            503,
            f"The database did not answer ({type(error).__name__}): try again; `pandasync "
            "status` checks the database from the command line.",
            session,
        )

    def slots(self) -> asyncio.Semaphore:
        if self._db_slots is None:
            self._db_slots = asyncio.Semaphore(DB_CONCURRENCY)
        return self._db_slots

    @staticmethod
    def sessions(request: Request) -> async_sessionmaker[AsyncSession]:
        sessions: async_sessionmaker[AsyncSession] = request.app.state.pandasync.sessions
        return sessions

    @staticmethod
    def broker(request: Request) -> dramatiq.Broker:
        broker: dramatiq.Broker = request.app.state.pandasync.broker
        return broker

    def page(self, handler: Callable[[Request, Session], Awaitable[Response]]) -> Handler:
        """A page for a logged-in operator; bad query parameters answer 400."""

        async def endpoint(request: Request) -> Response:
            session = self.keys.session_of(request)
            if session is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                query = urlencode({"next": local_target(target)})
                return RedirectResponse(f"/console/login?{query}", 303, headers=SECURITY_HEADERS)
            try:
                async with self.slots():
                    return await handler(request, session)
            except BadInput as bad:
                return self.error(request, 400, str(bad), session)
            except (SQLAlchemyError, OSError) as error:
                return self.unavailable(request, error, session)

        return endpoint

    def action(
        self, handler: Callable[[Request, Session, dict[str, str]], Awaitable[Response]]
    ) -> Handler:
        """A form that changes something: a session, then its CSRF token, or nothing runs."""

        async def endpoint(request: Request) -> Response:
            session = self.keys.session_of(request)
            if session is None:
                return self.error(
                    request, 401, "You are not logged in (or the session ended).", None
                )
            try:
                form = await read_form(request)
            except FormTooLarge:
                return self.error(request, 413, "That form is too large.", session)
            if not same_origin(request) or not csrf_valid(session, form):
                log.warning("console.csrf_refused", path=request.url.path, client=_client(request))
                return self.error(
                    request,
                    403,
                    "This form did not come from this console session (or the session changed): "
                    "reload the page and try again.",
                    session,
                )
            try:
                async with self.slots():
                    return await handler(request, session, form)
            except BadInput as bad:
                return self.error(request, 400, str(bad), session)
            except (SQLAlchemyError, OSError) as error:
                return self.unavailable(request, error, session)

        return endpoint

    # --- login ------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        target = local_target(request.query_params.get("next"))
        if self.keys.session_of(request) is not None:
            return RedirectResponse(target, 303, headers=SECURITY_HEADERS)
        return self._login_page(request, target, None, 200)

    def _login_page(
        self, request: Request, target: str, problem: str | None, status: int
    ) -> Response:
        nonce, cookie = self.keys.new_login()
        response = self.render(
            request, "login.html", status, login_csrf=nonce, next=target, problem=problem
        )
        set_cookie(response, request, LOGIN_COOKIE, cookie, LOGIN_MAX_AGE_S)
        return response

    async def login(self, request: Request) -> Response:
        try:
            form = await read_form(request)
        except FormTooLarge:
            return self.error(request, 413, "That form is too large.", None)
        target = local_target(form.get("next"))
        nonce = self.keys.login_nonce_of(request)
        offered = form.get("csrf", "")
        if not same_origin(request) or nonce is None or not offered or offered != nonce:
            log.warning("console.csrf_refused", path=request.url.path, client=_client(request))
            return self._login_page(
                request, target, "The login form expired or came from elsewhere: try again.", 403
            )
        if not self.keys.token_matches(form.get("token", "")):
            log.warning("console.login_refused", client=_client(request))
            return self._login_page(request, target, "That is not the admin token.", 401)
        _, cookie = self.keys.new_session()
        response = RedirectResponse(target, 303, headers=SECURITY_HEADERS)
        set_cookie(response, request, SESSION_COOKIE, cookie, SESSION_MAX_AGE_S)
        clear_cookie(response, request, LOGIN_COOKIE)
        log.info("console.login", client=_client(request))
        return response

    async def logout(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        response = RedirectResponse("/console/login", 303, headers=SECURITY_HEADERS)
        clear_cookie(response, request, SESSION_COOKIE)
        return response

    # --- pages ------------------------------------------------------------------------------

    async def overview(self, request: Request, session: Session) -> Response:
        hours = int(
            _param(request, "hours", tuple(str(h) for h in queries.CHART_HOURS)) or DEFAULT_HOURS
        )
        async with queries.reading(self.sessions(request)) as db:
            data = await queries.overview(db, hours)
        end = data.now
        cards = []
        for pair in data.pairs:
            name = f"{pair.account_id} {pair.platform or 'no platform'}"
            activity = data.activity.get((pair.account_id, pair.platform))
            per_minute = data.bucket_s / 60
            received = (
                [n / per_minute for n in activity.received] if activity else [0.0] * data.buckets
            )
            total = activity.total if activity else 0
            rate = charts.bar_chart(
                charts.Series("received", received, "bars"),
                title=f"Messages received per minute, {name}",
                unit="/min",
                start=data.start,
                end=end,
                summary=f"{total} messages in the last {hours} h, "
                f"at most {max(received, default=0):.1f} per minute",
            )
            p50 = activity.lag_p50 if activity else [None] * data.buckets
            worst = activity.lag_max if activity else [None] * data.buckets
            worst_seen = max((v for v in worst if v is not None), default=None)
            lag = charts.line_chart(
                [charts.Series("median", p50, "line-p50"), charts.Series("max", worst, "line-max")],
                title=f"Callback to ledger lag, {name}",
                unit=" s",
                start=data.start,
                end=end,
                summary=(
                    f"longest lag in the last {hours} h: {views.age(worst_seen)}"
                    if worst_seen is not None
                    else f"no message in the last {hours} h"
                ),
            )
            cards.append({"pair": pair, "rate": rate, "lag": lag, "total": total})
        return self.render(
            request,
            "overview.html",
            session=session,
            data=data,
            cards=cards,
            hours_choices=queries.CHART_HOURS,
            nav="overview",
        )

    async def orders(self, request: Request, session: Session) -> Response:
        search = _param(request, "q")
        status = _param(request, "status", STATUSES)
        account = _param(request, "account")
        platform = _param(request, "platform", PLATFORMS)
        before = _int_param(request, "before")
        found = None
        async with queries.reading(self.sessions(request)) as db:
            if search is not None:
                platforms = [Platform(platform)] if platform else list(Platform)
                found = [
                    order for p in platforms for order in await find_orders(db, p, search, account)
                ]
                if len(found) == 1:
                    order = found[0]
                    return RedirectResponse(
                        _order_url(order.platform.value, order.order_id, order.account_id),
                        303,
                        headers=SECURITY_HEADERS,
                    )
                page = None
            else:
                page = await queries.orders_page(
                    db, status=status, account=account, platform=platform, before=before
                )
        filters = {"status": status, "account": account, "platform": platform}
        return self.render(
            request,
            "orders.html",
            session=session,
            nav="orders",
            search=search,
            found=found,
            page=page,
            filters=filters,
            older_url=_older_url("/console/orders", filters, page),
            statuses=STATUSES,
            platforms=PLATFORMS,
            window=queries.SCAN_WINDOW,
            order_url=_order_url,
        )

    async def order(self, request: Request, session: Session) -> Response:
        platform = request.path_params["platform"]
        order_id = request.path_params["order_id"]
        if platform not in PLATFORMS:
            raise BadInput(f"platform must be one of: {', '.join(PLATFORMS)}")
        if len(order_id) > MAX_PARAM_CHARS:
            raise BadInput(f"an order id is at most {MAX_PARAM_CHARS} characters")
        account = _param(request, "account")
        async with queries.reading(self.sessions(request)) as db:
            found = await find_orders(db, Platform(platform), order_id, account)
            timeline = await order_timeline(db, found[0]) if len(found) == 1 else None
        if not found:
            which = f" for account {account}" if account else ""
            return self.error(
                request, 404, f"No order {platform} {order_id} in the ledger{which}.", session
            )
        if timeline is None:
            return self.render(
                request, "orders.html", session=session, nav="orders", search=order_id,
                found=found, page=None, filters={}, older_url=None, statuses=STATUSES,
                platforms=PLATFORMS, window=queries.SCAN_WINDOW, order_url=_order_url,
            )  # fmt: skip
        events = [
            {"event": e, "text": describe(e), "fields": views.detail_fields(e)}
            for e in timeline.events
        ]
        return self.render(
            request,
            "order.html",
            session=session,
            nav="orders",
            o=timeline.order,
            open_failure=timeline.open_failure,
            failure_text=failure_text,
            events=events,
        )

    async def messages(self, request: Request, session: Session) -> Response:
        message_type = _param(request, "type")
        state = _param(request, "state", STATES)
        signature = _param(request, "signature", SIGNATURES)
        before = _int_param(request, "before")
        async with queries.reading(self.sessions(request)) as db:
            page = await queries.messages_page(
                db, message_type=message_type, state=state, signature=signature, before=before
            )
        filters = {"type": message_type, "state": state, "signature": signature}
        return self.render(
            request,
            "messages.html",
            session=session,
            nav="messages",
            page=page,
            filters=filters,
            older_url=_older_url("/console/messages", filters, page),
            states=STATES,
            signatures=SIGNATURES,
            window=queries.SCAN_WINDOW,
            order_url=_order_url,
        )

    async def message(self, request: Request, session: Session) -> Response:
        inbox_id = request.path_params["inbox_id"]
        async with queries.reading(self.sessions(request)) as db:
            row = await queries.message(db, inbox_id)
        if row is None:
            return self.error(request, 404, f"No message #{inbox_id} in the inbox.", session)
        body, pretty, cut = views.body_text(bytes(row.raw_body))
        return self.render(
            request,
            "message.html",
            session=session,
            nav="messages",
            m=row,
            headers=views.shown_headers(row.headers),
            body=body,
            pretty=pretty,
            cut=cut,
            body_bytes=len(row.raw_body),
            order_url=_order_url,
        )

    async def failures(self, request: Request, session: Session) -> Response:
        after = _int_param(request, "after")
        async with queries.reading(self.sessions(request)) as db:
            rows, total = await list_open(db, after=after, limit=queries.PAGE_SIZE + 1)
        more = len(rows) > queries.PAGE_SIZE
        rows = rows[: queries.PAGE_SIZE]
        notice = None
        replayed = _int_param(request, "replayed")
        dismissed = _int_param(request, "dismissed")
        if replayed is not None:
            notice = f"Queued {replayed} failed order(s) for another sync."
        elif dismissed is not None:
            notice = f"Dismissed failure #{dismissed}."
        return self.render(
            request,
            "failures.html",
            session=session,
            nav="failures",
            rows=rows,
            total=total,
            after=after,
            next_url=f"/console/failures?after={rows[-1].id}" if more else None,
            notice=notice,
            order_url=_order_url,
        )

    async def deliveries(self, request: Request, session: Session) -> Response:
        """The reseller's webhook endpoints and the latest deliveries to one of them."""
        chosen = _int_param(request, "endpoint")
        failed = _param(request, "failed", ("1",)) is not None
        async with queries.reading(self.sessions(request)) as db:
            endpoints = await outbound.list_endpoints(db)
            if chosen is None and endpoints:
                chosen = endpoints[0].id
            known = any(e.id == chosen for e in endpoints)
            rows = (
                await outbound.deliveries(db, chosen, failed_only=failed, limit=queries.PAGE_SIZE)
                if chosen is not None and known
                else []
            )
        if chosen is not None and not known:
            return self.error(request, 404, f"No webhook endpoint #{chosen}.", session)
        return self.render(
            request,
            "deliveries.html",
            session=session,
            nav="deliveries",
            endpoints=endpoints,
            chosen=chosen,
            failed=failed,
            rows=rows,
            limit=queries.PAGE_SIZE,
        )

    # --- actions ----------------------------------------------------------------------------

    async def replay(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        failure_id: int | None = request.path_params.get("failure_id")
        targets = await open_failures(self.sessions(request), failure_id=failure_id)
        if failure_id is not None and not targets:
            return self.error(
                request,
                409,
                f"Sync failure #{failure_id} is not open (or does not exist).",
                session,
            )
        try:
            orders = replay_orders(targets)
            await asyncio.to_thread(enqueue_replays, self.broker(request), orders)
        except Exception as error:  # the broker is down: say so, mark nothing
            log.warning("console.replay_failed", error=type(error).__name__)
            return self.error(
                request,
                503,
                f"The broker did not take the replay ({type(error).__name__}): check that it "
                "runs, then try again. No failure was marked replayed.",
                session,
            )
        ids = [t.id for t in targets]
        if ids:
            await mark_replayed(self.sessions(request), ids)
        log.info("console.replay", failures=len(ids), client=_client(request))
        return RedirectResponse(
            f"/console/failures?replayed={len(ids)}", 303, headers=SECURITY_HEADERS
        )

    async def dismiss(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        failure_id: int = request.path_params["failure_id"]
        by = form.get("by", "").strip() or DISMISSED_BY_DEFAULT
        try:
            async with session_scope(self.sessions(request)) as db:
                await dismiss_failures(db, [failure_id], by=by, reason=form.get("reason", ""))
        except DismissRefused as refused:
            status = 400
            if isinstance(refused, NoSuchFailure):
                status = 404
            elif isinstance(refused, AlreadyClosed | ClosedMeanwhile):
                status = 409
            return self.error(request, status, f"Not dismissed: {refused}", session)
        log.info("console.dismiss", failure_id=failure_id, by=by, client=_client(request))
        return RedirectResponse(
            f"/console/failures?dismissed={failure_id}", 303, headers=SECURITY_HEADERS
        )

    async def stylesheet(self, request: Request) -> Response:
        return Response(
            (TEMPLATES / "console.css").read_bytes(),
            media_type="text/css",
            headers={"cache-control": "max-age=3600", "x-content-type-options": "nosniff"},
        )


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _order_url(platform: str, order_id: str, account: str | None = None) -> str:
    from urllib.parse import quote

    url = f"/console/orders/{quote(platform, safe='')}/{quote(order_id, safe='')}"
    return url + (f"?{urlencode({'account': account})}" if account else "")


def _older_url(path: str, filters: dict[str, str | None], page: queries.Page | None) -> str | None:
    if page is None or page.older is None:
        return None
    kept = {k: v for k, v in filters.items() if v is not None}
    return f"{path}?{urlencode({**kept, 'before': page.older})}"


def console_off_reason(settings: Settings) -> str | None:
    """Why the console is off, or None when it is on."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        return "PANDASYNC_ADMIN_TOKEN is not set."
    if len(token) < MIN_TOKEN_CHARS:
        return f"PANDASYNC_ADMIN_TOKEN is shorter than {MIN_TOKEN_CHARS} characters."
    return None


def console_routes(settings: Settings) -> list[BaseRoute]:
    """The routes of ``/console``: the console, or the page that says it is off."""
    reason = console_off_reason(settings)
    if reason is not None:
        templates = Jinja2Templates(env=_environment())

        async def off(request: Request) -> Response:
            return templates.TemplateResponse(
                request,
                "off.html",
                {"reason": reason, "session": None},
                status_code=404,
                headers=SECURITY_HEADERS,
            )

        return [
            Route("/console", off, methods=["GET", "POST"]),
            Mount("/console", routes=[Route("/{path:path}", off, methods=["GET", "POST"])]),
        ]
    assert settings.admin_token is not None
    console = Console(Keys(settings.admin_token.get_secret_value()))

    async def to_overview(request: Request) -> Response:
        return RedirectResponse("/console/", 308, headers=SECURITY_HEADERS)

    return [
        Route("/console", to_overview, methods=["GET"]),
        Mount(
            "/console",
            routes=[
                Route("/", console.page(console.overview), methods=["GET"]),
                Route("/login", console.login_form, methods=["GET"]),
                Route("/login", console.login, methods=["POST"]),
                Route("/logout", console.action(console.logout), methods=["POST"]),
                Route("/console.css", console.stylesheet, methods=["GET"]),
                Route("/orders", console.page(console.orders), methods=["GET"]),
                Route(
                    "/orders/{platform}/{order_id}", console.page(console.order), methods=["GET"]
                ),
                Route("/messages", console.page(console.messages), methods=["GET"]),
                Route("/messages/{inbox_id:int}", console.page(console.message), methods=["GET"]),
                Route("/failures", console.page(console.failures), methods=["GET"]),
                Route("/deliveries", console.page(console.deliveries), methods=["GET"]),
                Route("/failures/replay", console.action(console.replay), methods=["POST"]),
                Route(
                    "/failures/{failure_id:int}/replay",
                    console.action(console.replay),
                    methods=["POST"],
                ),
                Route(
                    "/failures/{failure_id:int}/dismiss",
                    console.action(console.dismiss),
                    methods=["POST"],
                ),
            ],
        ),
    ]
