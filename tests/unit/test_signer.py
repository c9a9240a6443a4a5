"""The signer (docs/upstream.md#requests-host-and-signing): known answers, header set, units,
nonces, verification."""

from __future__ import annotations

import hashlib
import re

import pytest

from service.pandapon.signer import (
    NONCE_LENGTH,
    SIGNED_HEADERS,
    Credentials,
    Md5ConcatSigner,
    new_nonce,
    signature_matches,
    signed_headers,
    timestamp_now,
    timestamp_to_seconds,
)

# Computed independently: printf '<access_key><timestamp><nonce><secret>' | md5sum, upper-cased.
KNOWN_ANSWERS = [
    (
        ("ak-12345", "1715669977082", "0123456789abcdef0123456789abcdef", "secret-xyz"),
        "A0A9AC9A790EADC9BFAC8986BBF71AA2",
    ),
    (
        ("sandbox-key", "1715669977", "f" * 32, "sandbox-secret"),
        "A10A26ED324EE5623BE17CBC1E4ED782",
    ),
    (("", "", "", ""), "D41D8CD98F00B204E9800998ECF8427E"),
]
CREDENTIALS = Credentials(access_key="ak-12345", access_secret="secret-xyz", user_id="u-1")


@pytest.mark.parametrize(("parts", "expected"), KNOWN_ANSWERS)
def test_md5_concat_signer_known_answers(parts: tuple[str, str, str, str], expected: str) -> None:
    assert Md5ConcatSigner().sign(*parts) == expected


def test_signed_headers_are_the_five_documented_ones_with_a_known_signature() -> None:
    headers = signed_headers(
        CREDENTIALS, unit="ms", now=1715669977.082, nonce="0123456789abcdef0123456789abcdef"
    )
    assert headers == {
        "access-key": "ak-12345",
        "timestamp": "1715669977082",
        "nonce-str": "0123456789abcdef0123456789abcdef",
        "user-id": "u-1",
        "signature": "A0A9AC9A790EADC9BFAC8986BBF71AA2",
    }
    assert tuple(headers) == SIGNED_HEADERS


def test_signature_has_the_documented_shape() -> None:
    signature = signed_headers(CREDENTIALS)["signature"]
    assert re.fullmatch(r"[0-9A-F]{32}", signature)


@pytest.mark.parametrize(("unit", "expected"), [("ms", "1715669977082"), ("s", "1715669977")])
def test_timestamp_unit_is_a_setting(unit: str, expected: str) -> None:
    assert timestamp_now(unit, 1715669977.0829) == expected  # type: ignore[arg-type]
    assert timestamp_to_seconds(expected, unit) == pytest.approx(  # type: ignore[arg-type]
        1715669977.082 if unit == "ms" else 1715669977.0
    )


@pytest.mark.parametrize("value", ["", "12a", "-5", "1.5", "1" * 17])
def test_timestamp_parse_refuses_anything_but_digits(value: str) -> None:
    with pytest.raises(ValueError, match="integer"):
        timestamp_to_seconds(value, "ms")


def test_nonces_are_32_characters_and_fresh() -> None:
    nonces = {new_nonce() for _ in range(200)}
    assert len(nonces) == 200
    assert all(len(n) == NONCE_LENGTH == 32 and re.fullmatch(r"[0-9a-f]+", n) for n in nonces)
    first, second = signed_headers(CREDENTIALS), signed_headers(CREDENTIALS)
    assert first["nonce-str"] != second["nonce-str"]


def test_signature_matches_accepts_ours_in_any_case_and_refuses_a_wrong_secret() -> None:
    headers = signed_headers(CREDENTIALS)
    args = (headers["access-key"], headers["timestamp"], headers["nonce-str"])
    assert signature_matches("secret-xyz", *args, headers["signature"])
    assert signature_matches("secret-xyz", *args, headers["signature"].lower())
    assert not signature_matches("another-secret", *args, headers["signature"])
    assert not signature_matches("secret-xyz", *args, "0" * 32)


def test_signer_is_swappable() -> None:
    class Sha256Signer:
        def sign(self, access_key: str, timestamp: str, nonce: str, access_secret: str) -> str:
            payload = f"{access_key}{timestamp}{nonce}{access_secret}".encode()
            return hashlib.sha256(payload).hexdigest().upper()

    signer = Sha256Signer()
    headers = signed_headers(CREDENTIALS, signer=signer, now=1.0, nonce="n" * 32)
    expected = hashlib.sha256(("ak-12345" + "1000" + "n" * 32 + "secret-xyz").encode())
    assert headers["signature"] == expected.hexdigest().upper()
    args = ("ak-12345", "1000", "n" * 32, headers["signature"])
    assert signature_matches("secret-xyz", *args, signer=signer)
    assert not signature_matches("secret-xyz", *args)  # the default signer disagrees
