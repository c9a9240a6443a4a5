"""What the receiver answers when it does not answer 200.

    WebhookError             base; ``status`` is the HTTP status, ``reason`` a short code
    ├── Rejected             the request is at fault (4xx); PandaPon retrying will not help
    │   ├── PayloadTooLarge      413: declared or streamed body over MAX_BODY_BYTES
    │   ├── UnsupportedMediaType 415: the content type is not JSON
    │   ├── MalformedRequest     400: the body is not UTF-8 JSON, or not an envelope we can read
    │   ├── VerificationFailed   401: signature, timestamp, nonce or token refused
    │   └── RequestTimeout       408: the body did not arrive within BODY_TIMEOUT_S
    └── StoreUnavailable     503: the inbox could not be written in time; PandaPon retries

``reason`` is also the ``reason`` label of ``pandasync_webhook_rejected_total``, so it is one of
a small fixed set; ``detail`` is for a human and never carries a secret.
"""

from __future__ import annotations


class WebhookError(Exception):
    """A webhook request that is answered with something other than 200."""

    status: int = 500

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


class Rejected(WebhookError):
    """The request itself is refused (4xx)."""

    status = 400


class PayloadTooLarge(Rejected):
    """The body is over MAX_BODY_BYTES."""

    status = 413


class UnsupportedMediaType(Rejected):
    """The content type is not JSON, or names a charset other than UTF-8."""

    status = 415


class MalformedRequest(Rejected):
    """The body is not JSON, or not a PandaPon envelope."""

    status = 400


class VerificationFailed(Rejected):
    """The request could not be shown to come from PandaPon."""

    status = 401


class RequestTimeout(Rejected):
    """The client did not send the whole body in time."""

    status = 408


class StoreUnavailable(WebhookError):
    """The inbox could not be written within the bound; the message is not acknowledged."""

    status = 503
