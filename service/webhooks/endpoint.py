"""``POST /webhooks/pandapon[/{token}]``: limits, parse, verify, store, answer.

The order of the checks is the order of their cost, and nothing is written before the last:

1. declared body size (413) and content type (415: ``application/json`` only, in UTF-8),
   from the headers alone;
2. the body, read only up to MAX_BODY_BYTES (413 as soon as it goes over) and only for
   BODY_TIMEOUT_S (408);
3. UTF-8 JSON (400); a probe (empty body, or no ``messageType``) is answered 200 here,
   unverified, since it stores nothing and says nothing;
4. verification of the headers and path token (401);
5. the envelope (400);
6. the inbox write with the nonce, committed (200 stored or duplicate; 401 replayed nonce;
   503 when it cannot be done within INBOX_WRITE_TIMEOUT_MS).

Every other failure is caught and answered 503 (the message was not stored, so PandaPon's
retry is the right outcome); nothing a client sends reaches Starlette's 500 handler.

The receiver is a plain ASGI endpoint (no Request object): it reads the body from
``receive`` itself, which is also what lets it stop reading at the limit. The request's head
has its limits before this (size, read timeout: see limits.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable

import structlog
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.config import Settings
from service.domain import InboxState
from service.ledger import unmapped
from service.pandapon.signer import (
    HEADER_ACCESS_KEY,
    HEADER_NONCE,
    HEADER_TIMESTAMP,
    HEADER_USER_ID,
)
from service.webhooks import metrics
from service.webhooks.envelope import MAX_ID_LENGTH, decode_json, is_probe, parse_envelope
from service.webhooks.errors import (
    MalformedRequest,
    PayloadTooLarge,
    RequestTimeout,
    StoreUnavailable,
    UnsupportedMediaType,
    VerificationFailed,
    WebhookError,
)
from service.webhooks.inbox import InboxRow, InboxWriter, StoreOutcome, dedupe_key
from service.webhooks.request_ids import request_id_of
from service.webhooks.verify import Router

log = structlog.get_logger("pandasync.webhooks")
_stdlib_log = logging.getLogger("pandasync.webhooks")

# Stored, duplicate and probe get the same answer: the sender learns nothing from it.
OK_BODY = b'{"status":"ok"}'
JSON = "application/json"
# Read as JSON: application/json, in any case, with any parameters. A "+json" type is another
# format whatever its suffix; none is named here until PandaPon is seen to send one.
JSON_MEDIA_TYPES = frozenset({JSON})
JSON_CHARSETS = frozenset({"utf-8", "utf8"})
# Kept with a stored message: the headers the receiver reads (the signature headers but the
# signature itself; content type and length; the request id) and those that say who
# sent it. Anything else (a proxy's credentials, cookies, padding) is never stored.
STORED_HEADERS = (
    HEADER_ACCESS_KEY,
    HEADER_TIMESTAMP,
    HEADER_NONCE,
    HEADER_USER_ID,
    "content-type",
    "content-length",
    "transfer-encoding",
    "user-agent",
    "x-request-id",
    "x-forwarded-for",
    "x-real-ip",
)
# Each stored value is cut to this many characters (a nonce is 64 at most).
STORED_HEADER_CHARS = 256
DEFAULT_ACCOUNT = "default"


def _ok() -> Response:
    return Response(OK_BODY, media_type=JSON)


def _error(error: WebhookError) -> Response:
    # A client too slow to send its body does not keep the connection for another request.
    headers = {"connection": "close"} if isinstance(error, RequestTimeout) else None
    body = json.dumps({"error": error.reason}).encode()
    return Response(body, error.status, headers=headers, media_type=JSON)


def is_json_media_type(value: str | None) -> bool:
    """``application/json`` in any case, with any parameters but a charset other than UTF-8."""
    if not value:
        return False
    media, *parameters = value.split(";")
    if media.strip().lower() not in JSON_MEDIA_TYPES:
        return False
    for parameter in parameters:
        name, _, argument = parameter.partition("=")
        if name.strip().lower() == "charset":
            return argument.strip().strip('"').lower() in JSON_CHARSETS
    return True


def header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request headers by lower-case name (repeated ones joined with ", ")."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def headers_json(headers: dict[str, str]) -> str:
    """The headers to store with the message: those of STORED_HEADERS, each cut short."""
    kept = {
        # jsonb cannot hold NUL.
        name: headers[name][:STORED_HEADER_CHARS].replace("\x00", "\ufffd")
        for name in STORED_HEADERS
        if name in headers
    }
    return json.dumps(kept)


class Receiver:
    """The webhook endpoint; its writer is attached by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        # Built when the app is: a signature mode without credentials fails here, at startup.
        self._router = Router(settings)
        self._max_body = settings.max_body_bytes
        self._body_timeout_s = settings.body_timeout_s
        self._writer: InboxWriter | None = None

    def attach(self, writer: InboxWriter | None) -> None:
        self._writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A plain ASGI endpoint: the body is read straight from ``receive``, with the limit."""
        response = await self.handle(scope, receive)
        await response(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive) -> Response:
        metrics.RECEIVED.inc()
        try:
            return await self._handle(scope, receive)
        except WebhookError as error:
            metrics.rejected(error.reason)
            log.warning(
                "webhook.refused", status=error.status, reason=error.reason, detail=error.detail
            )
            return _error(error)
        except ClientDisconnect:
            metrics.rejected("client_disconnected")
            return Response(status_code=400)
        except Exception:
            metrics.rejected("internal_error")
            log.exception("webhook.internal_error")
            return _error(StoreUnavailable("internal_error"))

    async def _handle(self, scope: Scope, receive: Receive) -> Response:
        headers = header_map(scope["headers"])
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) == 0:
                return self._probe()
            if int(declared) > self._max_body:
                raise PayloadTooLarge("payload_too_large", f"body over {self._max_body} bytes")
        if not is_json_media_type(headers.get("content-type")):
            raise UnsupportedMediaType("unsupported_media_type", "send application/json")
        body = await self._read_body(receive)
        if not body.strip():
            return self._probe()
        document = decode_json(body)
        if is_probe(document):
            return self._probe()
        verifier, verified = self._router.verify(headers, scope.get("path_params", {}).get("token"))
        envelope = parse_envelope(document)
        account_id = self._account_id(verifier.account.user_id, headers.get(HEADER_USER_ID))
        routable = envelope.platform is not None and envelope.order_id is not None
        row = InboxRow(
            account_id=account_id,
            dedupe_key=dedupe_key(account_id, envelope.canonical),
            message_type=envelope.message_type,
            kind=envelope.kind,
            platform=envelope.platform,
            order_id=envelope.order_id,
            refund_id=envelope.refund_id,
            pushed_at=envelope.pushed_at,
            raw_body=body,
            headers_json=headers_json(headers),
            request_id=request_id_of(scope),
            state=InboxState.RECEIVED if routable else InboxState.IGNORED,
            nonce=verified.nonce,
            signature_state=verified.signature,
            unknown_type=not envelope.known_type,
        )
        if self._writer is None:
            raise StoreUnavailable("store_failed", "the receiver is not started")
        started = time.perf_counter()
        result = await self._writer.store(row)
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        if result.outcome is StoreOutcome.REPLAYED_NONCE:
            raise VerificationFailed("replayed_nonce", "nonce already used")
        # Labelled with the account's name, as the upstream metrics are (`default` alone).
        counters = metrics.for_account(verifier.account.name)
        if verified.signature is not None:
            counters.signatures[verified.signature].inc()
        if result.outcome is StoreOutcome.DUPLICATE:
            counters.duplicates.inc()
        else:
            counters.accepted[envelope.kind].inc()
            if not envelope.known_type:
                counters.unknown_types.inc()
                unmapped.count_message_type(envelope.platform)
        # A stored message is recorded, with its request id, by its inbox row; a log line
        # for each would cost a third of the request (structlog's chain runs even for a
        # filtered level, hence the explicit check).
        if _stdlib_log.isEnabledFor(logging.DEBUG):
            log.debug(
                "webhook.stored" if result.inbox_id else "webhook.duplicate",
                inbox_id=result.inbox_id,
                state=row.state.value,
                message_type=envelope.message_type,
                kind=envelope.kind.value,
                known_type=envelope.known_type,
                signature=verified.signature.value if verified.signature else None,
                platform=envelope.platform.value if envelope.platform else None,
                order_id=envelope.order_id,
            )
        return _ok()

    def _probe(self) -> Response:
        metrics.PROBES.inc()
        log.info("webhook.probe")
        return _ok()

    async def _read_body(self, receive: Receive) -> bytes:
        """The body, refused as soon as it goes over the size limit (the rest is never read)
        or when it has not all come within the time limit."""
        try:
            async with asyncio.timeout(self._body_timeout_s):
                return await self._read_body_in_limit(receive)
        except TimeoutError:
            detail = f"body not received within {self._body_timeout_s:g} s"
            raise RequestTimeout("body_timeout", detail) from None

    async def _read_body_in_limit(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge("payload_too_large", f"body over {self._max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _account_id(self, user_id: str | None, header_user_id: str | None) -> str:
        """The account's user-id; only the single-account settings without PANDASYNC_USER_ID
        take the header's (or ``default``), as they always did."""
        if user_id:
            return user_id
        value = (header_user_id or "").strip()
        if not value:
            return DEFAULT_ACCOUNT
        if len(value) > MAX_ID_LENGTH:
            raise MalformedRequest("malformed_envelope", "user-id header too long")
        return value
