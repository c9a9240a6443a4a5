"""Who sent this? Header signature and path token checks (docs/upstream.md#callback-authentication).

``PANDASYNC_WEBHOOK_AUTH`` picks the mode (docs/operations.md#deploying):

- ``auto`` (the default): on ``/webhooks/pandapon/{token}`` the token authenticates; signature
  headers, when present, are checked and their outcome is recorded (``SignatureState``), never
  refused, since PandaPon does not document signing its callbacks. On ``/webhooks/pandapon`` a
  valid signature is required, as in ``signature``.
- ``signature``: a valid signature is required; a token in the path must be right too.
- ``token``: the token path is required; signatures are recorded as in ``auto``.
- ``signature+token``: both are required.

A wrong token is refused in every mode.

With several accounts (``PANDASYNC_ACCOUNTS_FILE``) each account has its own ``Verifier`` (its
tokens, its access key and secret) and the ``Router`` picks it: the path token names the
account; on the bare path the ``access-key`` header does (or, unsigned, the ``user-id``). Headers
that name another account than the token, or each other, are refused (``account_mismatch``): a
callback signed with A's secret but claiming B is checked with B's secret and fails. The lookups
are dicts built at start; a token is looked up by its SHA-256, so the lookup reveals nothing of a
token by its timing, and then compared in constant time.

Everything here is a pure function of the headers, the path token and the clock; the one check
that needs shared state, "this nonce was not seen before", is made by the inbox writer in the
same transaction that stores the message (see ``inbox.py``), so a replay and a store cannot
both succeed. It applies only where a signature
is what authenticates: on the token path a replayed callback is just a duplicate hint.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service.accounts import Account
from service.config import ConfigError, Settings
from service.domain import SignatureState
from service.pandapon.signer import (
    DEFAULT_SIGNER,
    HEADER_ACCESS_KEY,
    HEADER_USER_ID,
    SignatureCheck,
    Signer,
    check_signature,
    constant_time_equal,
)
from service.webhooks.errors import VerificationFailed


@dataclass(frozen=True, slots=True)
class Verified:
    """A request that passed every stateless check.

    ``nonce`` is still to be recorded (set only where the signature is what authenticates);
    ``signature`` is what its signature headers showed, None where nobody could check them
    (``token`` mode without credentials).
    """

    nonce: str | None
    signature: SignatureState | None


def describe_mode(settings: Settings) -> str:
    """One line: which callbacks the receiver accepts, for the web role's start (no secret)."""
    mode = settings.webhook_auth
    token_url = "/webhooks/pandapon/<PANDASYNC_WEBHOOK_TOKEN>"  # noqa: S105 - a placeholder
    has_token = settings.webhook_token is not None
    if settings.accounts_file is not None:
        accounts = settings.accounts()
        token_url = "/webhooks/pandapon/<the account's webhook_token>"  # noqa: S105
        has_token = any(a.tokens for a in accounts)
        return f"{len(accounts)} accounts: " + _describe(mode, token_url, has_token)
    return _describe(mode, token_url, has_token)


def _describe(mode: str, token_url: str, has_token: bool) -> str:
    if mode == "auto":
        if has_token:
            return (
                f"callbacks accepted at {token_url} signed or not (signatures checked and "
                "recorded), and at /webhooks/pandapon only when validly signed "
                "(PANDASYNC_WEBHOOK_AUTH=auto)"
            )
        return (
            "callbacks accepted at /webhooks/pandapon only when validly signed "
            "(PANDASYNC_WEBHOOK_AUTH=auto without PANDASYNC_WEBHOOK_TOKEN: set a token so "
            "unsigned callbacks are accepted too)"
        )
    if mode == "token":
        return (
            f"callbacks accepted at {token_url} only, signed or not (PANDASYNC_WEBHOOK_AUTH=token)"
        )
    if mode == "signature+token":
        return (
            f"callbacks accepted at {token_url} only when also validly signed "
            "(PANDASYNC_WEBHOOK_AUTH=signature+token)"
        )
    where = f"/webhooks/pandapon and {token_url}" if has_token else "/webhooks/pandapon"
    return (
        f"callbacks accepted at {where} only when validly signed (PANDASYNC_WEBHOOK_AUTH=signature)"
    )


class Verifier:
    """Stateless checks of one request, by the configured mode."""

    def __init__(
        self,
        settings: Settings,
        *,
        account: Account | None = None,
        signer: Signer = DEFAULT_SIGNER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Checks for ``account`` (default: the only account of ``settings``)."""
        mode = settings.webhook_auth
        if account is None:
            account = settings.accounts()[0]
        self.account = account
        # The current token and any previous one still accepted during a rotation.
        self._tokens = account.tokens
        # Where the signature is what authenticates: always in the signature modes; in auto,
        # on the bare path.
        self._signature_required_with_token = "signature" in mode
        self._signature_required_without_token = mode != "token"
        self._token_required = "token" in mode
        self._access_key = account.access_key or ""
        self._access_secret = account.secret()
        self._can_check = bool(self._access_key and self._access_secret)
        if mode != "token" and not self._can_check:
            raise ConfigError(
                f"PANDASYNC_WEBHOOK_AUTH={mode} verifies callback signatures and needs "
                "PANDASYNC_ACCESS_KEY and PANDASYNC_ACCESS_SECRET (or set "
                "PANDASYNC_WEBHOOK_AUTH=token with PANDASYNC_WEBHOOK_TOKEN)"
            )
        self._tolerance_s = float(settings.signature_tolerance_s)
        self._unit = settings.timestamp_unit
        self._signer = signer
        self._clock = clock

    def check_signature(self, headers: Mapping[str, str]) -> SignatureCheck:
        """What the signature headers show, with the configured credentials, unit and clock."""
        return check_signature(
            headers,
            access_key=self._access_key,
            access_secret=self._access_secret,
            unit=self._unit,
            tolerance_s=self._tolerance_s,
            now=self._clock(),
            signer=self._signer,
        )

    def verify(self, headers: Mapping[str, str], path_token: str | None) -> Verified:
        """Raise VerificationFailed with a reason, or say what is left to check and record."""
        self._verify_token(path_token)
        required = (
            self._signature_required_with_token
            if path_token is not None
            else self._signature_required_without_token
        )
        if not self._can_check:  # token mode without credentials: nothing to check against
            return Verified(nonce=None, signature=None)
        check = self.check_signature(headers)
        if not required:
            return Verified(nonce=None, signature=check.state)
        if check.state is not SignatureState.VALID:
            assert check.reason is not None
            raise VerificationFailed(check.reason, check.detail)
        return Verified(nonce=check.nonce, signature=SignatureState.VALID)

    def _verify_token(self, path_token: str | None) -> None:
        if path_token is None:
            if self._token_required:
                raise VerificationFailed("missing_token", "this endpoint needs the token path")
            return
        # A token in the path is checked in every mode: a wrong one is never ignored.
        if not any([constant_time_equal(path_token, token) for token in self._tokens]):
            raise VerificationFailed("wrong_token", "wrong token")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Router:
    """Which account's ``Verifier`` checks a request (see the module docstring).

    With one account every request goes to it, exactly as before the accounts file existed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        signer: Signer = DEFAULT_SIGNER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        verifiers = [
            Verifier(settings, account=account, signer=signer, clock=clock)
            for account in settings.accounts()
        ]
        self.verifiers = verifiers
        self._only = verifiers[0] if len(verifiers) == 1 else None
        self._by_token = {token_digest(token): v for v in verifiers for token in v.account.tokens}
        self._by_access_key = {v.account.access_key: v for v in verifiers if v.account.access_key}
        self._by_user_id = {v.account.user_id: v for v in verifiers if v.account.user_id}
        self._token_required = "token" in settings.webhook_auth

    def route(self, headers: Mapping[str, str], path_token: str | None) -> Verifier:
        """The verifier of the account the request names; VerificationFailed when it names
        none, or two different ones."""
        if self._only is not None:
            return self._only
        by_key = self._by_access_key.get(headers.get(HEADER_ACCESS_KEY, "").strip())
        by_user = self._by_user_id.get(headers.get(HEADER_USER_ID, "").strip())
        if by_key is not None and by_user is not None and by_key is not by_user:
            raise VerificationFailed(
                "account_mismatch", "access-key and user-id headers name different accounts"
            )
        if path_token is not None:
            by_token = self._by_token.get(token_digest(path_token))
            if by_token is None:
                raise VerificationFailed("wrong_token", "wrong token")
            claimed = by_key or by_user
            if claimed is not None and claimed is not by_token:
                raise VerificationFailed(
                    "account_mismatch", "the headers name another account than the token"
                )
            return by_token
        if self._token_required:
            raise VerificationFailed("missing_token", "this endpoint needs the token path")
        if by_key is not None:
            return by_key
        if headers.get(HEADER_ACCESS_KEY, "").strip():
            raise VerificationFailed("wrong_access_key", "unknown access key")
        if by_user is not None:
            return by_user  # its signature check says what is missing
        raise VerificationFailed("missing_header", f"missing header {HEADER_ACCESS_KEY}")

    def verify(
        self, headers: Mapping[str, str], path_token: str | None
    ) -> tuple[Verifier, Verified]:
        verifier = self.route(headers, path_token)
        return verifier, verifier.verify(headers, path_token)
