"""The webhook half of ``pandasync doctor``: the URL to enter, and what PandaPon really sends.

``webhook_check`` says which URL to enter in PandaPon's console for the configured
``PANDASYNC_WEBHOOK_AUTH``. ``listen`` serves ``POST /webhooks/pandapon[/{token}]`` for a while,
answers 200 to everything (so the console's Verify passes), stores nothing, and describes each
callback: body shape, message type and how the receiver classifies it, the path token, which
signature headers came and whether they verify (callback signing is not public:
docs/upstream.md#callback-authentication; this is where an operator finds out). Header values of
secrets are never shown.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import ConfigError, Settings, TimestampUnit
from service.domain import MessageKind, Platform, SignatureState
from service.pandapon.signer import (
    HEADER_TIMESTAMP,
    SIGNED_HEADERS,
    SignatureCheck,
    check_signature,
    timestamp_to_seconds,
)
from service.webhooks.envelope import decode_json, is_probe, parse_envelope
from service.webhooks.errors import MalformedRequest, VerificationFailed
from service.webhooks.verify import Verifier

from .checks import other_unit
from .report import Check, Fix, Mark

WEBHOOK_PATH = "/webhooks/pandapon"
# Modes in which the token path is how callbacks authenticate (docs/operations.md#deploying).
TOKEN_MODES = ("auto", "token", "signature+token")
TokenState = Literal["right", "wrong", "none"]
Signing = Literal["ours", "stale", "other", "unsigned"]
STARTUP_TIMEOUT_S = 10.0


# --- the URL to enter ---------------------------------------------------------------------------


def public_base(settings: Settings) -> str:
    return settings.public_url or f"http://{settings.host}:{settings.port}"


def webhook_url(settings: Settings) -> str:
    """The callback URL for PandaPon's console (the token is in it: the operator's terminal)."""
    base = public_base(settings) + WEBHOOK_PATH
    if settings.webhook_token is not None and settings.webhook_auth in TOKEN_MODES:
        return f"{base}/{settings.webhook_token.get_secret_value()}"
    return base


def webhook_check(settings: Settings) -> Check:
    notes: list[str] = []
    if settings.public_url is None:
        notes.append(
            "PANDASYNC_PUBLIC_URL is unset: this is the web role's own address, "
            "which PandaPon must be able to reach"
        )
    if settings.webhook_auth != "auto" or settings.webhook_token is None:
        notes.append(
            "recommended: PANDASYNC_WEBHOOK_AUTH=auto with a PANDASYNC_WEBHOOK_TOKEN: "
            "the token URL works however PandaPon signs (docs/operations.md#deploying)"
        )
    detail = f"enter {webhook_url(settings)} in PandaPon's console and press Verify"
    return Check(Mark.OK, "webhook url", detail, notes=tuple(notes))


# --- one callback -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallbackReport:
    """What one request to the listener showed; ``refused`` is the reason the web role would
    refuse it with the current settings (None: it would be accepted)."""

    content_type: str | None
    shape: str
    probe: bool
    token: TokenState
    headers: tuple[str, ...]
    signature: SignatureState
    signing: Signing
    signing_detail: str
    unit_fix: TimestampUnit | None = None
    message_type: str | None = None
    kind: MessageKind | None = None
    known_type: bool | None = None
    platform: Platform | None = None
    order_id: str | None = None
    unreadable: str | None = None
    refused: str | None = None


def signature_headers(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Names (never values) of the headers that sign or identify a callback."""
    names = [h for h in (*SIGNED_HEADERS, "authorization") if h in headers]
    names.extend(h for h in sorted(headers) if "sign" in h and h not in names)
    return tuple(names)


def _shape(body: bytes) -> tuple[str, dict[str, Any] | None, bool]:
    """(description, document, probe); document is None when there is nothing to classify."""
    if not body.strip():
        return "probe: empty body", None, True
    try:
        document = decode_json(body)
    except MalformedRequest as error:
        return f"not JSON ({error.detail})", None, False
    if is_probe(document):
        keys = f" (keys: {', '.join(sorted(document)[:8])})" if document else ""
        return f"probe: no messageType{keys}", None, True
    inner = document.get("messageBody")
    if isinstance(inner, dict):
        return "envelope, messageBody an object", document, False
    if isinstance(inner, str):
        return "envelope, messageBody a JSON string", document, False
    if inner is None:
        return "flat body (no messageBody)", document, False
    return f"envelope, messageBody a {type(inner).__name__}", document, False


def _signing(
    headers: Mapping[str, str], settings: Settings, now: float
) -> tuple[SignatureState, Signing, str, TimestampUnit | None]:
    secret = settings.access_secret.get_secret_value() if settings.access_secret else ""

    def check(unit: TimestampUnit) -> SignatureCheck:
        return check_signature(
            headers,
            access_key=settings.access_key or "",
            access_secret=secret,
            unit=unit,
            tolerance_s=float(settings.signature_tolerance_s),
            now=now,
        )

    unit = settings.timestamp_unit
    result = check(unit)
    state = result.state
    if state is SignatureState.VALID:
        return state, "ours", "signed as we sign", None
    if state is not SignatureState.ABSENT:
        other = other_unit(unit)
        if check(other).state is SignatureState.VALID:
            return state, "ours", f"signed as we sign, with the timestamp in {other}", other
    if state is SignatureState.STALE:
        age = now - timestamp_to_seconds(headers[HEADER_TIMESTAMP].strip(), unit)
        when = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s in the future"
        return state, "stale", f"signed as we sign, but stale: timestamp {when}", None
    if state is SignatureState.MISMATCH:
        return state, "other", f"signed some other way ({result.detail})", None
    others = [h for h in signature_headers(headers) if h not in SIGNED_HEADERS]
    if others:
        return state, "other", f"signed some other way ({', '.join(others)})", None
    return state, "unsigned", "unsigned", None


def _token_state(path_token: str | None, settings: Settings) -> TokenState:
    if path_token is None:
        return "none"
    token = settings.webhook_token
    return "right" if token is not None and path_token == token.get_secret_value() else "wrong"


def inspect_callback(
    headers: Mapping[str, str],
    body: bytes,
    path_token: str | None,
    *,
    settings: Settings,
    verifier: Verifier | None,
    now: float | None = None,
) -> CallbackReport:
    """Describe one request (``headers`` by lower-case name); no I/O, nothing stored."""
    now = time.time() if now is None else now
    shape, document, probe = _shape(body)
    state, signing, signing_detail, unit_fix = _signing(headers, settings, now)
    common: dict[str, Any] = {
        "content_type": headers.get("content-type"),
        "shape": shape,
        "token": _token_state(path_token, settings),
        "headers": signature_headers(headers),
        "signature": state,
        "signing": signing,
        "signing_detail": signing_detail,
        "unit_fix": unit_fix,
    }
    if document is None:
        return CallbackReport(probe=probe, **common)
    refused: str | None = None
    if verifier is not None:
        try:
            verifier.verify(headers, path_token)
        except VerificationFailed as error:
            refused = error.reason
    try:
        envelope = parse_envelope(document)
    except MalformedRequest as error:
        return CallbackReport(probe=False, unreadable=error.detail, refused=refused, **common)
    return CallbackReport(
        probe=False,
        message_type=envelope.message_type,
        kind=envelope.kind,
        known_type=envelope.known_type,
        platform=envelope.platform,
        order_id=envelope.order_id,
        refused=refused,
        **common,
    )


def render_callback(number: int, report: CallbackReport) -> str:
    parts = [report.content_type or "no content type", report.shape]
    if report.unreadable is not None:
        parts.append(f"unreadable envelope: {report.unreadable}")
    elif report.message_type is not None:
        known = "known type" if report.known_type else "unknown type"
        kind = report.kind.value if report.kind else "?"
        platform = report.platform.value if report.platform else "no platform"
        order = f"order {report.order_id}" if report.order_id else "no order id found"
        parts.append(f"{report.message_type}: {kind}, {known}, {platform}, {order}")
    parts.append(f"token {report.token}")
    parts.append(f"headers: {' '.join(report.headers) or 'none'}")
    parts.append(f"signature {report.signature.value}: {report.signing_detail}")
    if not report.probe:
        parts.append(f"refused ({report.refused})" if report.refused else "accepted")
    return f"  · callback {number}: " + "; ".join(parts)


# --- all the callbacks --------------------------------------------------------------------------


def callbacks_check(reports: Sequence[CallbackReport], settings: Settings, seconds: float) -> Check:
    """One line on what came in while listening, with the settings that would accept it."""
    name = "callbacks"
    url = webhook_url(settings)
    messages = [r for r in reports if not r.probe]
    if not reports:
        detail = (
            f"none in {seconds:g} s: during --listen press Verify in PandaPon's console "
            f"(URL {url}) or change an order"
        )
        return Check(Mark.UNKNOWN, name, detail)
    if not messages:
        detail = (
            f"{len(reports)} probe(s) only (Verify reaches us): change an order during --listen "
            "to see how messages are signed"
        )
        return Check(Mark.UNKNOWN, name, detail)
    seen = ", ".join(
        f"{n} {what}" for what, n in Counter(r.signing_detail for r in messages).items()
    )
    problems: list[str] = []
    fixes: list[Fix] = []
    unit = next((r.unit_fix for r in messages if r.unit_fix), None)
    if unit is not None:
        problems.append(f"set PANDASYNC_TIMESTAMP_UNIT={unit}")
        fixes.append(Fix("PANDASYNC_TIMESTAMP_UNIT", unit))
    if any(r.refused in ("wrong_token", "missing_token") for r in messages):
        problems.append(f"sent to the wrong URL: enter {url}")
    signature_refusals = [
        r for r in messages if r.refused and r.refused not in ("wrong_token", "missing_token")
    ]
    if signature_refusals and unit is None:
        reasons = ", ".join(sorted({r.refused or "" for r in signature_refusals}))
        problems.append(
            f"{len(signature_refusals)} refused by the current settings ({reasons}): use the "
            "token URL with PANDASYNC_WEBHOOK_AUTH=auto"
        )
        fixes.extend(_token_fixes(settings))
    if problems:
        return Check(Mark.FAIL, name, f"{seen}: {'; '.join(problems)}", tuple(fixes))
    notes: tuple[str, ...] = ()
    if any(r.signing == "stale" for r in messages):
        notes = (
            "stale: the sender's clock is off (or a retry is late); on the token URL that is "
            "only recorded, elsewhere it is refused",
        )
    return Check(Mark.OK, name, f"{seen}: all accepted by the current settings", notes=notes)


def _token_fixes(settings: Settings) -> list[Fix]:
    fixes = [Fix("PANDASYNC_WEBHOOK_AUTH", "auto")]
    if settings.webhook_token is None:
        # A fresh one: the operator needs a value to paste, and then the URL with it.
        fixes.append(Fix("PANDASYNC_WEBHOOK_TOKEN", secrets.token_hex(24)))
    return fixes


# --- the listener -------------------------------------------------------------------------------


def listener_app(
    settings: Settings, verifier: Verifier | None, on_callback: Callable[[CallbackReport], None]
) -> Starlette:
    """Answers 200 to every POST on both webhook paths; stores nothing."""
    limit = settings.max_body_bytes

    async def receive(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                break  # enough to describe it; the web role would answer 413
        headers = {name.lower(): value for name, value in request.headers.items()}
        token = request.path_params.get("token")
        on_callback(
            inspect_callback(headers, body[:limit], token, settings=settings, verifier=verifier)
        )
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, receive, methods=["POST"]),
            Route(WEBHOOK_PATH + "/{token}", receive, methods=["POST"]),
        ]
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket (OSError when the address is taken or not ours)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def listen(
    settings: Settings,
    *,
    host: str,
    port: int,
    seconds: float,
    on_ready: Callable[[str], None],
    on_callback: Callable[[CallbackReport], None],
) -> Check:
    """Listen for ``seconds``, report each callback as it comes, and sum them up."""
    name = "callbacks"
    try:
        verifier: Verifier | None = Verifier(settings)
    except ConfigError:
        verifier = None  # a mode the web role would refuse to start in; say what came anyway
    try:
        sock = bind(host, port)
    except OSError as error:
        detail = f"cannot listen on {host}:{port} ({error.strerror or error}): pass --host/--port"
        return Check(Mark.UNKNOWN, name, detail)
    reports: list[CallbackReport] = []

    def received(report: CallbackReport) -> None:
        reports.append(report)
        on_callback(report)

    config = uvicorn.Config(
        listener_app(settings, verifier, received),
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        started = time.monotonic()
        while not server.started and not task.done():
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                break
            await asyncio.sleep(0.02)
        if not server.started:
            return Check(Mark.UNKNOWN, name, f"cannot listen on {host}:{port}: pass --host/--port")
        bound_host, bound_port = sock.getsockname()[:2]
        on_ready(f"http://{bound_host}:{bound_port}{WEBHOOK_PATH}")
        await asyncio.wait({task}, timeout=seconds)
    finally:
        server.should_exit = True
        await task
        sock.close()
    return callbacks_check(reports, settings, seconds)
