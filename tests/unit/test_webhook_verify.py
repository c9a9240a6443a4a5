"""Signature and token checks, one test per way to fail (the HTTP tests repeat them end to end)."""

from __future__ import annotations

import pytest

from service.config import ConfigError, Settings, load_settings
from service.ledger.models import SignatureState
from service.pandapon.signer import Credentials, signed_headers
from service.webhooks.errors import VerificationFailed
from service.webhooks.verify import Verifier, describe_mode
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
    v = verifier(webhook_auth="signature", webhook_token=TOKEN)
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


# --- auto (the default): the token authenticates; signatures are checked and recorded ---------


def auto(**overrides: object) -> Verifier:
    return verifier(webhook_token=TOKEN, **overrides)


def test_auto_is_the_default_mode() -> None:
    assert settings().webhook_auth == "auto"


def test_auto_token_path_accepts_an_unsigned_callback_as_absent() -> None:
    verified = auto().verify({"content-type": "application/json"}, TOKEN)
    assert verified.signature is SignatureState.ABSENT
    assert verified.nonce is None


def test_auto_token_path_records_a_valid_signature_without_claiming_its_nonce() -> None:
    # On the token path a replayed callback is only a duplicate hint, so no nonce is recorded.
    verified = auto().verify(headers(), TOKEN)
    assert verified.signature is SignatureState.VALID
    assert verified.nonce is None


def test_auto_token_path_accepts_another_secret_as_mismatch() -> None:
    other = Credentials(ACCESS_KEY, "not-our-secret-at-all", USER_ID)
    assert auto().verify(signed_headers(other, now=NOW), TOKEN).signature is (
        SignatureState.MISMATCH
    )


@pytest.mark.parametrize("at", [NOW - 3600, NOW + 3600])
def test_auto_token_path_accepts_an_old_or_early_signature_as_stale(at: float) -> None:
    assert auto().verify(headers(at=at), TOKEN).signature is SignatureState.STALE


@pytest.mark.parametrize(
    ("change", "state"),
    [
        ({"access-key": "ak-someone-else"}, SignatureState.MISMATCH),
        ({"timestamp": "yesterday"}, SignatureState.MISMATCH),
        ({"nonce-str": ""}, SignatureState.MISMATCH),
        ({"signature": ""}, SignatureState.ABSENT),
    ],
)
def test_auto_token_path_never_refuses_for_the_signature(
    change: dict[str, str], state: SignatureState
) -> None:
    assert auto().verify(headers(**change), TOKEN).signature is state


def test_auto_bare_path_requires_a_valid_signature() -> None:
    v = auto()
    assert reason_of(v, {}) == "missing_header"
    assert reason_of(v, headers(at=NOW - 3600)) == "stale_timestamp"
    assert reason_of(v, headers(signature="0" * 32)) == "bad_signature"
    verified = v.verify(headers(), None)
    assert verified.signature is SignatureState.VALID
    assert verified.nonce  # the signature is what authenticates here: its nonce is claimed


def test_auto_wrong_token_is_refused_even_when_signed() -> None:
    assert reason_of(auto(), headers(), "guess-" + TOKEN) == "wrong_token"


def test_auto_without_a_token_refuses_any_token_path() -> None:
    assert reason_of(verifier(), headers(), TOKEN) == "wrong_token"


def test_auto_without_token_or_credentials_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match="PANDASYNC_WEBHOOK_AUTH=token"):
        Verifier(settings(access_key=None, access_secret=None))


def test_token_mode_records_the_signature_when_it_can() -> None:
    v = verifier(webhook_auth="token", webhook_token=TOKEN)
    assert v.verify({}, TOKEN).signature is SignatureState.ABSENT
    assert v.verify(headers(), TOKEN).signature is SignatureState.VALID


def test_token_mode_without_credentials_records_nothing() -> None:
    v = Verifier(
        settings(access_key=None, access_secret=None, webhook_auth="token", webhook_token=TOKEN)
    )
    assert v.verify(headers(), TOKEN).signature is None


def test_signature_mode_stays_strict_on_the_token_path() -> None:
    v = verifier(webhook_auth="signature", webhook_token=TOKEN)
    assert reason_of(v, {}, TOKEN) == "missing_header"
    assert reason_of(v, headers(at=NOW - 3600), TOKEN) == "stale_timestamp"


def test_a_wrong_signature_with_an_old_timestamp_is_a_mismatch_not_stale() -> None:
    # Stale means "signed as we sign, but late"; a signature we cannot reproduce says nothing
    # about the clock.
    v = auto()
    h = headers(at=NOW - 3600, signature="0" * 32)
    assert v.check_signature(h).state is SignatureState.MISMATCH
    assert v.check_signature(h).reason == "bad_signature"


def test_a_timestamp_in_the_other_unit_shows_as_stale() -> None:
    seconds = signed_headers(CREDENTIALS, unit="s", now=NOW)
    check = auto().check_signature(seconds)  # read as milliseconds: 1970
    assert (check.state, check.reason) == (SignatureState.STALE, "stale_timestamp")
    assert auto(timestamp_unit="s").check_signature(seconds).state is SignatureState.VALID


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"webhook_token": TOKEN}, "at /webhooks/pandapon/<PANDASYNC_WEBHOOK_TOKEN> signed or not"),
        ({}, "set a token so unsigned callbacks are accepted too"),
        ({"webhook_auth": "token", "webhook_token": TOKEN}, "only, signed or not"),
        ({"webhook_auth": "signature+token", "webhook_token": TOKEN}, "only when also validly"),
        ({"webhook_auth": "signature"}, "at /webhooks/pandapon only when validly signed"),
    ],
)
def test_the_start_line_says_what_is_accepted_and_never_the_token(
    overrides: dict[str, object], expected: str
) -> None:
    line = describe_mode(settings(**overrides))
    assert expected in line
    assert TOKEN not in line
