"""Signature and token checks, one test per way to fail (the HTTP tests repeat them end to end)."""

from __future__ import annotations

import pytest

from service.config import ConfigError, Settings, load_settings
from service.pandapon.signer import Credentials, signed_headers
from service.webhooks.errors import VerificationFailed
from service.webhooks.verify import Verifier
from tests.support.webhook_requests import ACCESS_KEY, ACCESS_SECRET, CREDENTIALS, TOKEN, USER_ID

NOW = 1_790_000_000.0


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": "postgresql+asyncpg://u@h/db",
        "access_key": ACCESS_KEY,
        "access_secret": ACCESS_SECRET,
        "user_id": USER_ID,
        "signature_tolerance_s": 600,
        "timestamp_unit": "ms",
    }
    values.update(overrides)
    return load_settings(**values)


def verifier(**overrides: object) -> Verifier:
    return Verifier(settings(**overrides), clock=lambda: NOW)


def headers(at: float = NOW, **changes: str) -> dict[str, str]:
    return {**signed_headers(CREDENTIALS, now=at), **changes}


def reason_of(v: Verifier, h: dict[str, str], token: str | None = None) -> str:
    with pytest.raises(VerificationFailed) as caught:
        v.verify(h, token)
    return caught.value.reason


def test_signed_request_passes_and_returns_its_nonce() -> None:
    h = headers()
    assert verifier().verify(h, None).nonce == h["nonce-str"]


def test_signature_is_case_insensitive_hex() -> None:
    h = headers()
    assert verifier().verify({**h, "signature": h["signature"].lower()}, None)


@pytest.mark.parametrize("name", ["access-key", "timestamp", "nonce-str", "signature"])
def test_missing_header(name: str) -> None:
    h = headers()
    del h[name]
    assert reason_of(verifier(), h) == "missing_header"


def test_empty_header_counts_as_missing() -> None:
    assert reason_of(verifier(), headers(signature="  ")) == "missing_header"


def test_user_id_header_is_not_required() -> None:
    h = headers()
    del h["user-id"]
    assert verifier().verify(h, None).nonce


def test_wrong_access_key() -> None:
    other = Credentials("ak-someone-else", ACCESS_SECRET, USER_ID)
    assert reason_of(verifier(), signed_headers(other, now=NOW)) == "wrong_access_key"


def test_stale_timestamp() -> None:
    assert reason_of(verifier(), headers(at=NOW - 601)) == "stale_timestamp"


def test_future_timestamp() -> None:
    assert reason_of(verifier(), headers(at=NOW + 601)) == "future_timestamp"


def test_timestamps_inside_the_tolerance_pass_both_ways() -> None:
    v = verifier()
    assert v.verify(headers(at=NOW - 599), None)
    assert v.verify(headers(at=NOW + 599), None)


def test_timestamp_in_seconds_when_configured() -> None:
    v = verifier(timestamp_unit="s")
    assert v.verify(signed_headers(CREDENTIALS, unit="s", now=NOW), None)
    # A millisecond timestamp read as seconds is far in the future.
    assert reason_of(v, headers()) == "future_timestamp"


@pytest.mark.parametrize("value", ["yesterday", "-1715669977082", "1.5", "9" * 17])
def test_unreadable_timestamp(value: str) -> None:
    assert reason_of(verifier(), headers(timestamp=value)) == "bad_timestamp"


def test_wrong_signature() -> None:
    assert reason_of(verifier(), headers(signature="B7F83FE2ADC8D8F044F2E01F0FFE8C80")) == (
        "bad_signature"
    )


def test_signature_made_with_another_secret() -> None:
    other = Credentials(ACCESS_KEY, "not-our-secret-at-all", USER_ID)
    assert reason_of(verifier(), signed_headers(other, now=NOW)) == "bad_signature"


def test_nonce_longer_than_the_column() -> None:
    h = signed_headers(CREDENTIALS, now=NOW, nonce="n" * 65)
    assert reason_of(verifier(), h) == "bad_nonce"


def test_token_mode_needs_the_token_path() -> None:
    v = verifier(webhook_auth="token", webhook_token=TOKEN)
    assert v.verify({}, TOKEN).nonce is None
    assert reason_of(v, {}, None) == "missing_token"


def test_wrong_token() -> None:
    v = verifier(webhook_auth="token", webhook_token=TOKEN)
    assert reason_of(v, {}, TOKEN[:-1] + "X") == "wrong_token"


def test_signature_and_token_mode_needs_both() -> None:
    v = verifier(webhook_auth="signature+token", webhook_token=TOKEN)
    assert v.verify(headers(), TOKEN).nonce
    assert reason_of(v, headers(), None) == "missing_token"
    assert reason_of(v, headers(signature="0" * 32), TOKEN) == "bad_signature"


def test_a_token_in_the_path_is_checked_in_signature_mode_too() -> None:
    v = verifier(webhook_token=TOKEN)
    assert v.verify(headers(), TOKEN)
    assert reason_of(v, headers(), "guess-" + TOKEN) == "wrong_token"


@pytest.mark.parametrize("missing", ["access_key", "access_secret"])
def test_signature_mode_without_credentials_fails_at_construction(missing: str) -> None:
    with pytest.raises(ConfigError, match="PANDASYNC_ACCESS_KEY and PANDASYNC_ACCESS_SECRET"):
        Verifier(settings(**{missing: None}))


def test_token_mode_needs_no_credentials() -> None:
    v = Verifier(
        settings(access_key=None, access_secret=None, webhook_auth="token", webhook_token=TOKEN)
    )
    assert v.verify({}, TOKEN).nonce is None
