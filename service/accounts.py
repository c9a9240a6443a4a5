"""The PandaPon accounts one deployment serves, and the accounts file that lists them.

``PANDASYNC_ACCOUNTS_FILE`` names a TOML file with one table per account, ``[accounts.NAME]``;
NAME is the account's name (``--account NAME``)::

    [accounts.shop-a]
    user_id = "2200001"                 # the PandaPon user-id; the ledger's account_id
    access_key = "ak-..."
    access_secret_env = "SHOP_A_SECRET" # or access_secret = "..."
    webhook_token = "..."               # /webhooks/pandapon/<token> of this account
    previous_webhook_tokens = ["..."]   # still accepted while PandaPon's console switches over
    rate_limit_rps = 5                  # else PANDASYNC_UPSTREAM_RATE_LIMIT_RPS
    api_base_url = "https://..."        # else PANDASYNC_API_BASE_URL

Without the file, the single-account settings (``PANDASYNC_USER_ID``, ``ACCESS_KEY`` …) are the
account named ``default``, exactly as before. Every problem of the file is reported at once, one
line each, naming the file, the account and the field; a secret's value never is. This module
imports nothing of ours, so every room can use it, like ``service.config``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

DEFAULT_ACCOUNT_NAME = "default"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A token is one path segment of the webhook URL (the same rule as PANDASYNC_WEBHOOK_TOKEN).
MIN_TOKEN_CHARS = 16
TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~")
MAX_USER_ID_CHARS = 64
KNOWN_KEYS = frozenset(
    {
        "user_id",
        "access_key",
        "access_secret",
        "access_secret_env",
        "webhook_token",
        "previous_webhook_tokens",
        "rate_limit_rps",
        "api_base_url",
    }
)


class AccountsError(Exception):
    """The accounts could not be loaded; ``lines`` holds one problem each."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True, slots=True)
class Account:
    """One PandaPon account: its credentials, its callback tokens, its upstream.

    ``user_id``, ``access_key`` and ``access_secret`` are always set for an account of the file;
    the ``default`` account of the single-account settings may lack them (token mode without
    credentials), as before. ``in_file`` tells the two apart (the rate limiter's Redis key of
    the ``default`` account stays what it always was).
    """

    name: str
    user_id: str | None
    access_key: str | None
    access_secret: SecretStr | None = field(repr=False)
    webhook_token: SecretStr | None = field(default=None, repr=False)
    previous_webhook_tokens: tuple[SecretStr, ...] = field(default=(), repr=False)
    rate_limit_rps: float | None = None
    api_base_url: str | None = None
    in_file: bool = False

    @property
    def has_credentials(self) -> bool:
        return bool(self.access_key and self.access_secret and self.user_id)

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token that authenticates this account's callbacks, the current one first."""
        every = (self.webhook_token, *self.previous_webhook_tokens)
        return tuple(t.get_secret_value() for t in every if t is not None)

    def secret(self) -> str:
        return self.access_secret.get_secret_value() if self.access_secret else ""


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a webhook token, or None."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`)"
    if not set(token) <= TOKEN_CHARS:
        return "may hold only letters, digits and - _ . ~ (it is part of a URL)"
    return None


def load_accounts_file(path: Path, environ: Mapping[str, str] | None = None) -> list[Account]:
    """The accounts of the TOML file ``path``, in file order, or AccountsError naming every
    problem (file, account, field). Secrets named by ``access_secret_env`` come from
    ``environ`` (the process environment by default)."""
    env = os.environ if environ is None else environ
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise AccountsError(
            [f"{where}: cannot read the accounts file ({error.strerror})"]
        ) from None
    except UnicodeDecodeError:
        raise AccountsError([f"{where}: not UTF-8 text"]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise AccountsError([f"{where}: not valid TOML: {error}"]) from None
    problems: list[str] = []
    accounts: list[Account] = []
    # Checked across accounts even when an account has another problem: every line at once.
    identities: list[tuple[str, list[tuple[str, str, str]]]] = []
    tables = document.get("accounts")
    for key, value in document.items():
        if key != "accounts":
            hint = f"[accounts.{key}]" if isinstance(value, dict) else "the [accounts.NAME] tables"
            problems.append(f"{where}: {key}: not an accounts table: an account goes in {hint}")
    if not isinstance(tables, dict) or not tables:
        # Tables outside [accounts] have said where an account goes; else say it here.
        raise AccountsError(
            problems or [f"{where}: no account: add a table such as [accounts.shop-a]"]
        )
    for name, table in tables.items():
        at = f"{where}: [accounts.{name}]"
        if not NAME_PATTERN.fullmatch(name):
            problems.append(f"{at}: invalid account name: use 1-64 of A-Z a-z 0-9 _ . -")
            continue
        if not isinstance(table, dict):
            problems.append(f"{at}: must be a table ([accounts.{name}] followed by its fields)")
            continue
        account = _account(name, table, at, env, problems)
        if account is not None:
            accounts.append(account)
        identities.append((name, _identity(table)))
    problems += _duplicates(identities, where)
    if problems:
        raise AccountsError(problems)
    return accounts


def _account(
    name: str, table: dict[str, Any], at: str, env: Mapping[str, str], problems: list[str]
) -> Account | None:
    before = len(problems)
    for key in sorted(set(table) - KNOWN_KEYS):
        problems.append(f"{at} {key}: unknown field (known: {', '.join(sorted(KNOWN_KEYS))})")
    user_id = _text(table, "user_id", at, problems, required=True)
    if user_id is not None and len(user_id) > MAX_USER_ID_CHARS:
        problems.append(f"{at} user_id: longer than {MAX_USER_ID_CHARS} characters")
    access_key = _text(table, "access_key", at, problems, required=True)
    secret = _secret(table, at, env, problems)
    token = _text(table, "webhook_token", at, problems, required=False)
    if token is not None and (why := token_problem(token)):
        problems.append(f"{at} webhook_token: {why}")
    previous: list[str] = []
    raw_previous = table.get("previous_webhook_tokens", [])
    if not isinstance(raw_previous, list) or not all(isinstance(t, str) for t in raw_previous):
        problems.append(f"{at} previous_webhook_tokens: must be a list of strings")
    else:
        for index, old in enumerate(raw_previous):
            if why := token_problem(old):
                problems.append(f"{at} previous_webhook_tokens[{index}]: {why}")
            previous.append(old)
    rate = table.get("rate_limit_rps")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0
    ):
        problems.append(f"{at} rate_limit_rps: must be a number above 0")
    base_url = _text(table, "api_base_url", at, problems, required=False)
    if base_url is not None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"{at} api_base_url: must be an http(s):// URL")
    if len(problems) > before:
        return None
    return Account(
        name=name,
        user_id=user_id,
        access_key=access_key,
        access_secret=SecretStr(secret) if secret is not None else None,
        webhook_token=SecretStr(token) if token is not None else None,
        previous_webhook_tokens=tuple(SecretStr(t) for t in previous),
        rate_limit_rps=float(rate) if rate is not None else None,
        api_base_url=base_url.rstrip("/") if base_url else None,
        in_file=True,
    )


def _text(
    table: dict[str, Any], key: str, at: str, problems: list[str], *, required: bool
) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            problems.append(f"{at} {key}: missing")
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{at} {key}: must be a non-empty string")
        return None
    return value.strip()


def _secret(
    table: dict[str, Any], at: str, env: Mapping[str, str], problems: list[str]
) -> str | None:
    """The account's secret; a problem never quotes it."""
    inline = table.get("access_secret")
    variable = table.get("access_secret_env")
    if inline is not None and variable is not None:
        problems.append(f"{at} access_secret: set access_secret or access_secret_env, not both")
        return None
    if variable is not None:
        if not isinstance(variable, str) or not variable.strip():
            problems.append(f"{at} access_secret_env: must name an environment variable")
            return None
        value = env.get(variable.strip(), "")
        if not value:
            problems.append(
                f"{at} access_secret_env: the environment variable {variable.strip()} is not set"
            )
            return None
        return value
    if inline is None:
        problems.append(f"{at} access_secret: missing (or set access_secret_env)")
        return None
    if not isinstance(inline, str) or not inline:
        problems.append(f"{at} access_secret: must be a non-empty string")
        return None
    return inline


def _identity(table: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, value, field) of what tells the account apart: its user-id, key and tokens."""
    found: list[tuple[str, str, str]] = []
    for key in ("user_id", "access_key", "webhook_token"):
        value = table.get(key)
        if isinstance(value, str) and value.strip():
            found.append(("token" if key == "webhook_token" else key, value.strip(), key))
    previous = table.get("previous_webhook_tokens")
    if isinstance(previous, list):
        for index, old in enumerate(previous):
            if isinstance(old, str) and old:
                found.append(("token", old, f"previous_webhook_tokens[{index}]"))
    return found


def _duplicates(identities: list[tuple[str, list[tuple[str, str, str]]]], where: str) -> list[str]:
    """Two accounts sharing a user-id, an access key or a token cannot be told apart."""
    problems: list[str] = []
    owners: dict[tuple[str, str], str] = {}
    for name, found in identities:
        for kind, value, field_name in found:
            owner = owners.setdefault((kind, value), name)
            if owner != name:
                problems.append(
                    f"{where}: [accounts.{name}] {field_name}: the same as account {owner}'s "
                    f"(each account needs its own {kind})"
                )
        tokens = [value for kind, value, _ in found if kind == "token"]
        if len(tokens) != len(set(tokens)):
            problems.append(
                f"{where}: [accounts.{name}] previous_webhook_tokens: a token listed twice"
            )
    return problems


def find_account(accounts: Iterable[Account], name: str) -> Account | None:
    """The account named ``name``, or None."""
    return next((a for a in accounts if a.name == name), None)
