"""Who sent this? Header signature and path token checks (``pandapon-api.md`` §1 and §3).

``PANDASYNC_WEBHOOK_AUTH`` picks ``signature``, ``token`` or both. Everything here is a pure
function of the headers, the path token and the clock; the one check that needs shared state,
"this nonce was not seen before", is made by the inbox writer in the same transaction that
stores the message (see ``inbox.py``), so a replay and a store cannot both succeed.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service.config import ConfigError, Settings
from service.pandapon.signer import (
    DEFAULT_SIGNER,
    HEADER_ACCESS_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Signer,
    signature_matches,
    timestamp_to_seconds,
)
from service.webhooks.errors import VerificationFailed

# Headers that must be present for a signature check. ``user-id`` is one of the five headers
# but is not signed, so refusing a request without it would add no assurance; it only feeds
# ``account_id`` when the setting USER_ID is unset.
REQUIRED_SIGNATURE_HEADERS = (HEADER_ACCESS_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
# The nonce is stored in webhook_nonces.nonce (varchar 64).
MAX_NONCE_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Verified:
    """A request that passed every stateless check; ``nonce`` is still to be recorded."""

    nonce: str | None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Verifier:
    """Stateless checks of one request, by the configured mode."""

    def __init__(
        self,
        settings: Settings,
        *,
        signer: Signer = DEFAULT_SIGNER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._check_signature = "signature" in settings.webhook_auth
        self._require_token = "token" in settings.webhook_auth
        self._token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
        self._access_key = settings.access_key or ""
        secret = settings.access_secret.get_secret_value() if settings.access_secret else ""
        self._access_secret = secret
        if self._check_signature and not (self._access_key and self._access_secret):
            raise ConfigError(
                f"PANDASYNC_WEBHOOK_AUTH={settings.webhook_auth} verifies callback signatures and "
                "needs PANDASYNC_ACCESS_KEY and PANDASYNC_ACCESS_SECRET"
            )
        self._tolerance_s = float(settings.signature_tolerance_s)
        self._unit = settings.timestamp_unit
        self._signer = signer
        self._clock = clock

    def verify(self, headers: Mapping[str, str], path_token: str | None) -> Verified:
        """Raise VerificationFailed with a reason, or say what is left to check."""
        self._verify_token(path_token)
        if not self._check_signature:
            return Verified(nonce=None)
        return Verified(nonce=self._verify_signature(headers))

    def _verify_token(self, path_token: str | None) -> None:
        if path_token is None:
            if self._require_token:
                raise VerificationFailed("missing_token", "this endpoint needs the token path")
            return
        # A token in the path is checked in every mode: a wrong one is never ignored.
        if self._token is None or not _same(path_token, self._token):
            raise VerificationFailed("wrong_token", "wrong token")

    def _verify_signature(self, headers: Mapping[str, str]) -> str:
        values: dict[str, str] = {}
        for name in REQUIRED_SIGNATURE_HEADERS:
            value = headers.get(name, "").strip()
            if not value:
                raise VerificationFailed("missing_header", f"missing header {name}")
            values[name] = value
        if not _same(values[HEADER_ACCESS_KEY], self._access_key):
            raise VerificationFailed("wrong_access_key", "unknown access key")
        nonce = values[HEADER_NONCE]
        if len(nonce) > MAX_NONCE_LENGTH:
            raise VerificationFailed("bad_nonce", f"nonce longer than {MAX_NONCE_LENGTH}")
        try:
            sent_at = timestamp_to_seconds(values[HEADER_TIMESTAMP], self._unit)
        except ValueError:
            raise VerificationFailed(
                "bad_timestamp", f"timestamp is not an integer in {self._unit}"
            ) from None
        skew = self._clock() - sent_at
        if skew > self._tolerance_s:
            raise VerificationFailed("stale_timestamp", "timestamp too old")
        if skew < -self._tolerance_s:
            raise VerificationFailed("future_timestamp", "timestamp in the future")
        if not signature_matches(
            self._access_secret,
            values[HEADER_ACCESS_KEY],
            values[HEADER_TIMESTAMP],
            nonce,
            values[HEADER_SIGNATURE],
            signer=self._signer,
        ):
            raise VerificationFailed("bad_signature", "signature does not match")
        return nonce
