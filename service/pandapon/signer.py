"""Request signing for PandaPon (docs/upstream.md#requests-host-and-signing), used both ways.

The documented headers are ``access-key``, ``timestamp``, ``nonce-str``, ``user-id`` and
``signature``; only the first three and the secret are signed. The algorithm itself is not
public: [assumed] ``UPPER(HEX(MD5(access_key + timestamp + nonce_str + access_secret)))``.
Everything that depends on that assumption goes through a ``Signer`` so another algorithm can be
swapped in without touching the client, the receiver or the sandbox.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from service.config import TimestampUnit
from service.domain import SignatureState

HEADER_ACCESS_KEY = "access-key"
HEADER_TIMESTAMP = "timestamp"
HEADER_NONCE = "nonce-str"
HEADER_USER_ID = "user-id"
HEADER_SIGNATURE = "signature"
SIGNED_HEADERS = (
    HEADER_ACCESS_KEY,
    HEADER_TIMESTAMP,
    HEADER_NONCE,
    HEADER_USER_ID,
    HEADER_SIGNATURE,
)

NONCE_LENGTH = 32


class Signer(Protocol):
    def sign(self, access_key: str, timestamp: str, nonce: str, access_secret: str) -> str: ...


class Md5ConcatSigner:
    """[assumed] MD5 over the plain concatenation, upper-case hex."""

    def sign(self, access_key: str, timestamp: str, nonce: str, access_secret: str) -> str:
        payload = f"{access_key}{timestamp}{nonce}{access_secret}".encode()
        return hashlib.md5(payload, usedforsecurity=False).hexdigest().upper()


DEFAULT_SIGNER: Signer = Md5ConcatSigner()


def new_nonce() -> str:
    """32 random characters from ``secrets`` (hex, so safe in a header)."""
    return secrets.token_hex(NONCE_LENGTH // 2)


def timestamp_now(unit: TimestampUnit, now: float | None = None) -> str:
    seconds = time.time() if now is None else now
    return str(int(seconds * 1000)) if unit == "ms" else str(int(seconds))


def timestamp_to_seconds(value: str, unit: TimestampUnit) -> float:
    """Parse a header timestamp in ``unit``; raises ValueError on anything but digits."""
    if not value.isdigit() or len(value) > 16:
        raise ValueError("timestamp is not an integer")
    return int(value) / 1000 if unit == "ms" else float(int(value))


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    access_secret: str
    user_id: str


def signed_headers(
    credentials: Credentials,
    *,
    unit: TimestampUnit = "ms",
    signer: Signer = DEFAULT_SIGNER,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The five headers for one request (or one callback)."""
    timestamp = timestamp_now(unit, now)
    nonce = nonce or new_nonce()
    return {
        HEADER_ACCESS_KEY: credentials.access_key,
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_USER_ID: credentials.user_id,
        HEADER_SIGNATURE: signer.sign(
            credentials.access_key, timestamp, nonce, credentials.access_secret
        ),
    }


def signature_matches(
    expected_secret: str,
    access_key: str,
    timestamp: str,
    nonce: str,
    signature: str,
    *,
    signer: Signer = DEFAULT_SIGNER,
) -> bool:
    """Constant-time comparison of a received signature with the one we compute."""
    expected = signer.sign(access_key, timestamp, nonce, expected_secret)
    return hmac.compare_digest(expected.encode(), signature.strip().upper().encode())


# --- checking a signed request (the web role's callbacks, the sandbox's query APIs) ---------

# Headers that must be present for a signature check. ``user-id`` is one of the five headers
# but is not signed, so refusing a request without it would add no assurance; it only feeds
# ``account_id`` when the setting USER_ID is unset.
REQUIRED_SIGNATURE_HEADERS = (HEADER_ACCESS_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
# The nonce is stored in webhook_nonces.nonce (varchar 64).
MAX_NONCE_LENGTH = 64


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """What the signature headers of one request showed.

    ``reason`` is the refusal reason a strict mode answers with (the ``reason`` label of
    ``pandasync_webhook_rejected_total``: ``missing_header``, ``bad_signature`` …), None when
    ``state`` is valid; ``nonce`` is set when the signature is valid.
    """

    state: SignatureState
    reason: str | None = None
    detail: str | None = None
    nonce: str | None = None


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check_signature(
    headers: Mapping[str, str],
    *,
    access_key: str,
    access_secret: str,
    unit: TimestampUnit,
    tolerance_s: float,
    now: float,
    signer: Signer = DEFAULT_SIGNER,
) -> SignatureCheck:
    """Classify the signature headers of a request (lower-case names) against our credentials.

    The signature is compared before the clock, so a right signature with an old timestamp is
    ``stale`` (the sender signs as we do; its clock or its retry is late) while anything signed
    otherwise is ``mismatch``, whatever its timestamp says.
    """
    signature = headers.get(HEADER_SIGNATURE, "").strip()
    if not signature:
        return SignatureCheck(
            SignatureState.ABSENT, "missing_header", f"missing header {HEADER_SIGNATURE}"
        )
    values: dict[str, str] = {}
    for name in REQUIRED_SIGNATURE_HEADERS:
        value = headers.get(name, "").strip()
        if not value:
            return SignatureCheck(
                SignatureState.MISMATCH, "missing_header", f"missing header {name}"
            )
        values[name] = value
    if not constant_time_equal(values[HEADER_ACCESS_KEY], access_key):
        return SignatureCheck(SignatureState.MISMATCH, "wrong_access_key", "unknown access key")
    nonce = values[HEADER_NONCE]
    if len(nonce) > MAX_NONCE_LENGTH:
        return SignatureCheck(
            SignatureState.MISMATCH, "bad_nonce", f"nonce longer than {MAX_NONCE_LENGTH}"
        )
    try:
        sent_at = timestamp_to_seconds(values[HEADER_TIMESTAMP], unit)
    except ValueError:
        return SignatureCheck(
            SignatureState.MISMATCH, "bad_timestamp", f"timestamp is not an integer in {unit}"
        )
    if not signature_matches(
        access_secret,
        values[HEADER_ACCESS_KEY],
        values[HEADER_TIMESTAMP],
        nonce,
        signature,
        signer=signer,
    ):
        return SignatureCheck(SignatureState.MISMATCH, "bad_signature", "signature does not match")
    skew = now - sent_at
    if skew > tolerance_s:
        return SignatureCheck(SignatureState.STALE, "stale_timestamp", "timestamp too old")
    if skew < -tolerance_s:
        return SignatureCheck(SignatureState.STALE, "future_timestamp", "timestamp in the future")
    return SignatureCheck(SignatureState.VALID, nonce=nonce)
