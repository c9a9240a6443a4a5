"""What can go wrong when asking PandaPon, as one exception tree.

```
PandaPonError                  base: every failure of a call to PandaPon
├── TransientError             worth retrying later, with backoff
│   ├── UpstreamTimeout        connect, read, write or pool timeout
│   │   └── UpstreamBudgetExceeded  the reconcile's time for upstream calls is spent
│   ├── UpstreamConnectError   connection refused, reset or closed mid-response
│   ├── UpstreamServerError    HTTP 5xx, or an envelope code 5xx
│   └── UpstreamRateLimited    HTTP 429 or envelope code 429; ``retry_after`` in seconds
├── PermanentError             the same request will fail the same way: record, don't retry
│   ├── UpstreamRejected       the envelope's ``code`` is not 200 (and not known transient)
│   ├── UpstreamClientError    HTTP 4xx other than 401, 403 and 429
│   └── MalformedResponse      a body that cannot be understood; ``field`` names the culprit
└── AuthError                  signature, access key, timestamp or user-id refused
```

Each error carries its context as attributes (``endpoint``, ``http_status``, ``request_id``,
``code``, ``msg``) rather than only in its message, so callers can log and branch on them. The
error codes are not public [assumed]: HTTP 401/403 and envelope codes 401/403 are read as an
auth failure, envelope 429 and 5xx as transient (``AUTH_CODES``, ``TRANSIENT_CODES`` below).

Every text on an error may come from upstream, as it came: a NUL, a lone surrogate or a
megabyte in ``msg`` or ``requestId`` is possible. ``clean_text`` makes any of it storable and
short; ``context()`` (what log lines carry) is already cleaned and cut to ``LOG_TEXT_LIMIT``.
"""

from __future__ import annotations

import re
from typing import Any

AUTH_CODES = frozenset({401, 403})
RATE_LIMIT_CODE = 429
LOG_TEXT_LIMIT = 500  # characters of one upstream text in a log line
CUT_MARK = "…"

# What a Postgres text cannot hold: NUL, and lone surrogates (a JSON "\ud800" decodes to one;
# it has no UTF-8 form).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: object, limit: int) -> str:
    """``value`` as text Postgres can store, at most ``limit`` characters (a cut ends in …)."""
    text = _UNSTORABLE.sub("", value if isinstance(value, str) else str(value))
    if len(text) <= limit:
        return text
    return text[: limit - len(CUT_MARK)] + CUT_MARK


def is_transient_code(code: int) -> bool:
    return code == RATE_LIMIT_CODE or 500 <= code <= 599


class PandaPonError(Exception):
    """A call to PandaPon failed."""

    outcome = "error"  # the ``outcome`` label of pandasync_upstream_requests_total

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
        code: int | None = None,
        msg: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.http_status = http_status
        self.request_id = request_id
        self.code = code
        self.msg = msg

    def context(self) -> dict[str, object]:
        """The attributes worth a log line (never a secret: none are kept here), each text
        cleaned and cut to ``LOG_TEXT_LIMIT``: upstream chooses them."""
        return _for_log(
            {
                "endpoint": self.endpoint,
                "http_status": self.http_status,
                "request_id": self.request_id,
                "code": self.code,
                "msg": self.msg,
                "outcome": self.outcome,
            }
        )

    def log_message(self) -> str:
        """The message, cleaned and cut for a log line (it may quote upstream's ``msg``)."""
        return clean_text(self.message, LOG_TEXT_LIMIT)


def _for_log(context: dict[str, object]) -> dict[str, object]:
    return {key: _loggable(value) for key, value in context.items()}


def _loggable(value: object) -> object:
    """A text cleaned and cut for a log line; so is a number too long to read (a code of 600
    digits); anything else as it is."""
    if isinstance(value, str):
        return clean_text(value, LOG_TEXT_LIMIT)
    if isinstance(value, int) and len(str(value)) > LOG_TEXT_LIMIT:
        return clean_text(value, LOG_TEXT_LIMIT)
    return value


class TransientError(PandaPonError):
    """Retry later: the request may well succeed then."""


class UpstreamTimeout(TransientError):
    """No answer within the configured connect, read, write or pool timeout."""

    outcome = "timeout"


class UpstreamConnectError(TransientError):
    """The connection could not be made or broke before a full response."""

    outcome = "connect_error"


class UpstreamServerError(TransientError):
    """PandaPon answered HTTP 5xx (or an envelope code in 500-599)."""

    outcome = "server_error"


class UpstreamRateLimited(TransientError):
    """PandaPon asked us to slow down; ``retry_after`` is its Retry-After, in seconds."""

    outcome = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after

    def context(self) -> dict[str, object]:
        return {**super().context(), "retry_after": self.retry_after}


class UpstreamBudgetExceeded(UpstreamTimeout):
    """The time a reconcile may spend on upstream calls is spent (slow answers, timeouts):
    its message goes back to the broker so that the worker thread serves other orders."""

    outcome = "budget_exceeded"


class PermanentError(PandaPonError):
    """Do not retry: the same request would fail the same way."""


class UpstreamRejected(PermanentError):
    """The envelope's ``code`` is not 200: PandaPon refused this request."""

    outcome = "rejected"


class UpstreamClientError(PermanentError):
    """HTTP 4xx (other than auth and 429): the request itself is wrong."""

    outcome = "client_error"


class MalformedResponse(PermanentError):
    """The body is not JSON, not an envelope, or a payload the mapping cannot understand."""

    outcome = "malformed"

    def __init__(self, message: str, *, field: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.field = field

    def context(self) -> dict[str, object]:
        return {**super().context(), **_for_log({"field": self.field})}


class AuthError(PandaPonError):
    """PandaPon refused our credentials: check ACCESS_KEY, ACCESS_SECRET, USER_ID, the clock."""

    outcome = "auth_error"
