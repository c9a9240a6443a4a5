"""``--account NAME``: which of the configured accounts a command acts on.

NAME is an account's table name in ``PANDASYNC_ACCOUNTS_FILE`` (``default`` for the
single-account settings) or its PandaPon user-id. A command over many orders acts on every
account when none is named; a command about one order needs the account named when several are
configured. A name that is no account ends in one line, exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import click

from service.accounts import Account
from service.config import Settings

F = TypeVar("F", bound=Callable[..., object])


def account_option(
    help_text: str = "Only this account (default: every account).",
) -> Callable[[F], F]:
    """The ``--account NAME`` option (an account name or its user-id)."""
    return click.option("--account", "account_name", default=None, metavar="NAME", help=help_text)


def _names(accounts: tuple[Account, ...]) -> str:
    return ", ".join(a.name for a in accounts)


def find(settings: Settings, name: str) -> Account | None:
    """The account named ``name`` (or whose user-id it is)."""
    accounts = settings.accounts()
    by_name = next((a for a in accounts if a.name == name), None)
    return by_name or next((a for a in accounts if a.user_id == name), None)


def _fail(command: str, message: str) -> NoReturn:
    click.echo(f"pandasync {command}: {message}", err=True)
    sys.exit(2)


def accounts_or_exit(settings: Settings, name: str | None, command: str) -> list[Account]:
    """The named account, or every account when ``name`` is None."""
    if name is None:
        return list(settings.accounts())
    account = find(settings, name)
    if account is None:
        _fail(
            command,
            f"no account {name!r} here: only the configured accounts "
            f"({_names(settings.accounts())}) can be named (by name or user-id)",
        )
    return [account]


def one_account_or_exit(settings: Settings, name: str | None, command: str) -> Account:
    """The named account, or the only one; several configured and none named: exit 2."""
    accounts = settings.accounts()
    if name is None:
        if len(accounts) > 1:
            _fail(
                command,
                f"{len(accounts)} accounts are configured ({_names(accounts)}): name one with "
                "--account",
            )
        return accounts[0]
    return accounts_or_exit(settings, name, command)[0]


def ledger_id_or_exit(account: Account, command: str) -> str:
    """The account's ``account_id`` in the ledger (its user-id)."""
    if not account.user_id:
        _fail(command, "PANDASYNC_USER_ID is not set")
    return account.user_id
