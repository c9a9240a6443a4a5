"""The accounts file: every problem is one line naming the file, the account and the field; a
secret never shows; without the file the single-account settings are the account ``default``."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.accounts import AccountsError, load_accounts_file
from service.config import ConfigError, load_settings

SECRET_A = "sa-very-secret-value-1"
SECRET_B = "sb-very-secret-value-2"
TOKEN_A = "tokenA" + "a" * 20
TOKEN_B = "tokenB" + "b" * 20
TOKEN_OLD = "tokenOld" + "c" * 20
GOOD = f"""
[accounts.shop-a]
user_id = "2200001"
access_key = "ak-a"
access_secret = "{SECRET_A}"
webhook_token = "{TOKEN_A}"
previous_webhook_tokens = ["{TOKEN_OLD}"]
rate_limit_rps = 5

[accounts.shop-b]
user_id = "2200002"
access_key = "ak-b"
access_secret_env = "SHOP_B_SECRET"
webhook_token = "{TOKEN_B}"
api_base_url = "http://127.0.0.1:9000/"
"""
ENV = {"SHOP_B_SECRET": SECRET_B}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(AccountsError) as caught:
        load_accounts_file(path, ENV if env is None else env)
    for line in caught.value.lines:
        assert line.startswith(str(path)), line
        assert SECRET_A not in line
        assert SECRET_B not in line
    return list(caught.value.lines)


def test_a_good_file_gives_every_account_in_order(tmp_path: Path) -> None:
    a, b = load_accounts_file(write(tmp_path, GOOD), ENV)
    assert (a.name, a.user_id, a.access_key, a.secret()) == ("shop-a", "2200001", "ak-a", SECRET_A)
    assert a.tokens == (TOKEN_A, TOKEN_OLD)
    assert a.rate_limit_rps == 5.0
    assert a.api_base_url is None
    assert a.in_file
    assert (b.name, b.secret(), b.api_base_url) == ("shop-b", SECRET_B, "http://127.0.0.1:9000")
    assert b.rate_limit_rps is None


def test_secrets_never_show_in_a_repr(tmp_path: Path) -> None:
    accounts = load_accounts_file(write(tmp_path, GOOD), ENV)
    shown = repr(accounts) + str(accounts)
    for secret in (SECRET_A, SECRET_B, TOKEN_A, TOKEN_B, TOKEN_OLD):
        assert secret not in shown
    assert "shop-a" in shown


BASE = '[accounts.x]\nuser_id = "1"\naccess_key = "k"\naccess_secret = "' + SECRET_A + '"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[accounts.x]\naccess_key = "k"\naccess_secret = "s"\n', "[accounts.x] user_id: missing"),
        ('[accounts.x]\nuser_id = "1"\naccess_secret = "s"\n', "[accounts.x] access_key: missing"),
        ('[accounts.x]\nuser_id = "1"\naccess_key = "k"\n', "[accounts.x] access_secret: missing"),
        (BASE + 'access_secret_env = "E"\n', "[accounts.x] access_secret: set access_secret or"),
        (
            '[accounts.x]\nuser_id = "1"\naccess_key = "k"\naccess_secret_env = "UNSET_VAR"\n',
            "[accounts.x] access_secret_env: the environment variable UNSET_VAR is not set",
        ),
        (BASE + "colour = 1\n", "[accounts.x] colour: unknown field"),
        (BASE + 'webhook_token = "short"\n', "[accounts.x] webhook_token: must be at least 16"),
        (
            BASE + 'webhook_token = "' + "a" * 20 + '/x"\n',
            "[accounts.x] webhook_token: may hold only",
        ),
        (BASE + 'previous_webhook_tokens = ["short"]\n', "[accounts.x] previous_webhook_tokens[0]"),
        (BASE + "rate_limit_rps = 0\n", "[accounts.x] rate_limit_rps: must be a number above 0"),
        (
            BASE + 'api_base_url = "ftp://x"\n',
            "[accounts.x] api_base_url: must be an http(s):// URL",
        ),
        (
            BASE.replace("[accounts.x]", '[accounts."bad name!"]'),
            "[accounts.bad name!]: invalid account name",
        ),
        (BASE.replace('"1"', "7"), "[accounts.x] user_id: must be a non-empty string"),
        ("[accounts]\nx = 1\n", "[accounts.x]: must be a table"),
        (
            BASE.replace("[accounts.x]", "[x]"),
            "x: not an accounts table: an account goes in [accounts.x]",
        ),
        ('title = "shops"\n' + BASE, "title: not an accounts table"),
    ],
)
def test_each_problem_is_one_line_naming_file_account_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    found = problems(tmp_path, text, env={})
    assert len(found) == 1, found
    assert expected in found[0]


def test_a_syntax_error_names_its_line(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, BASE + "oops = \n")
    assert "not valid TOML" in line
    assert "line 5" in line


def test_an_empty_or_missing_file(tmp_path: Path) -> None:
    assert "no account" in problems(tmp_path, "")[0]
    with pytest.raises(AccountsError, match="cannot read the accounts file"):
        load_accounts_file(tmp_path / "nowhere.toml", {})


@pytest.mark.parametrize(
    ("b_table", "field"),
    [
        (f'user_id = "2200001"\naccess_key = "ak-b"\nwebhook_token = "{TOKEN_B}"', "user_id"),
        (f'user_id = "2"\naccess_key = "ak-a"\nwebhook_token = "{TOKEN_B}"', "access_key"),
        (f'user_id = "2"\naccess_key = "ak-b"\nwebhook_token = "{TOKEN_A}"', "webhook_token"),
        (f'user_id = "2"\naccess_key = "ak-b"\nwebhook_token = "{TOKEN_OLD}"', "webhook_token"),
        (
            f'user_id = "2"\naccess_key = "ak-b"\nprevious_webhook_tokens = ["{TOKEN_A}"]',
            "previous_webhook_tokens[0]",
        ),
    ],
)
def test_two_accounts_sharing_an_identity_are_refused(
    tmp_path: Path, b_table: str, field: str
) -> None:
    text = (
        GOOD.split("[accounts.shop-b]")[0]
        + f'[accounts.shop-b]\naccess_secret = "{SECRET_B}"\n{b_table}\n'
    )
    (line,) = problems(tmp_path, text)
    assert f"[accounts.shop-b] {field}: the same as account shop-a's" in line
    assert TOKEN_A not in line
    assert TOKEN_OLD not in line


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = '[accounts.a]\nuser_id = "1"\n\n[accounts.b]\naccess_key = "k"\naccess_secret = "s"\n'
    found = problems(tmp_path, text, env={})
    assert any("[accounts.a] access_key: missing" in line for line in found)
    assert any("[accounts.a] access_secret: missing" in line for line in found)
    assert any("[accounts.b] user_id: missing" in line for line in found)


CREDENTIALS = ("PANDASYNC_USER_ID", "PANDASYNC_ACCESS_KEY", "PANDASYNC_ACCESS_SECRET")


@pytest.fixture
def clean_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> pytest.MonkeyPatch:
    for name in (
        *CREDENTIALS,
        "PANDASYNC_WEBHOOK_TOKEN",
        "PANDASYNC_ACCOUNTS_FILE",
        "PANDASYNC_WEBHOOK_AUTH",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # no stray .env
    return monkeypatch


def test_without_the_file_the_single_settings_are_the_account_default(
    clean_env: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(user_id="u1", access_key="k", access_secret=SECRET_A)
    (account,) = settings.accounts()
    assert (account.name, account.user_id, account.access_key) == ("default", "u1", "k")
    assert account.secret() == SECRET_A
    assert not account.in_file
    assert settings.for_account(account) is settings


def test_settings_load_the_file_and_stop_on_its_problems(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SHOP_B_SECRET", SECRET_B)
    settings = load_settings(accounts_file=write(tmp_path, GOOD))
    assert [a.name for a in settings.accounts()] == ["shop-a", "shop-b"]
    assert settings.has_credentials
    one = settings.for_account(settings.accounts()[1])
    assert (one.user_id, one.api_base_url, one.accounts()[0].name) == (
        "2200002",
        "http://127.0.0.1:9000",
        "default",
    )
    clean_env.delenv("SHOP_B_SECRET")
    with pytest.raises(ConfigError) as caught:
        load_settings(accounts_file=tmp_path / "accounts.toml")
    assert "[accounts.shop-b] access_secret_env: the environment variable SHOP_B_SECRET" in str(
        caught.value
    )


def test_the_file_and_the_single_account_credentials_together_are_refused(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SHOP_B_SECRET", SECRET_B)
    with pytest.raises(ConfigError) as caught:
        load_settings(
            accounts_file=write(tmp_path, GOOD), user_id="u1", access_secret="plain-secret-xyz"
        )
    message = str(caught.value)
    assert "PANDASYNC_ACCOUNTS_FILE and PANDASYNC_USER_ID, PANDASYNC_ACCESS_SECRET" in message
    assert "plain-secret-xyz" not in message


def test_token_modes_need_a_token_per_account(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"\[x\] webhook_token: missing"):
        load_settings(accounts_file=path, webhook_auth="token")
    assert load_settings(accounts_file=path, webhook_auth="signature").accounts()[0].name == "x"
