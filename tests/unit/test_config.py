"""Settings: defaults, parsing from the environment, and clear errors on invalid values."""

from __future__ import annotations

import pytest

from service.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PANDASYNC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_match_the_design() -> None:
    settings = load_settings()
    assert settings.database_url is None
    assert settings.broker_url is None
    assert settings.api_base_url == "https://api.pandapon.com"
    assert settings.webhook_auth == "auto"  # docs/operations.md#deploying
    assert settings.signature_tolerance_s == 600
    assert settings.timestamp_unit == "ms"
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.sweep_lookback_s == 86400


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANDASYNC_DATABASE_URL", "postgresql+asyncpg://u@db:5432/pandasync")
    monkeypatch.setenv("PANDASYNC_BROKER_URL", "redis://cache:6379/0")
    monkeypatch.setenv("PANDASYNC_TIMESTAMP_UNIT", "s")
    monkeypatch.setenv("PANDASYNC_ENDPOINT_OVERRIDES", '{"taobao_order_detail": {"path": "/x"}}')
    settings = load_settings()
    assert settings.database_url == "postgresql+asyncpg://u@db:5432/pandasync"
    assert settings.broker_url == "redis://cache:6379/0"
    assert settings.timestamp_unit == "s"
    assert settings.endpoint_overrides == {"taobao_order_detail": {"path": "/x"}}


def test_reads_dotenv_file(tmp_path: pytest.TempPathFactory) -> None:
    import pathlib

    pathlib.Path(".env").write_text("PANDASYNC_USER_ID=42\nPANDASYNC_ACCESS_KEY=ak\n")
    settings = load_settings()
    assert settings.user_id == "42"
    assert settings.access_key == "ak"


def test_secrets_never_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANDASYNC_ACCESS_SECRET", "s3cr3t-value")
    monkeypatch.setenv("PANDASYNC_WEBHOOK_AUTH", "token")
    monkeypatch.setenv("PANDASYNC_WEBHOOK_TOKEN", "tok-0123456789abcdef")
    settings = load_settings()
    assert "s3cr3t-value" not in repr(settings)
    assert "tok-0123456789abcdef" not in repr(settings)
    assert settings.access_secret is not None
    assert settings.access_secret.get_secret_value() == "s3cr3t-value"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PANDASYNC_DATABASE_URL": "mysql://u@h/db"}, "PANDASYNC_DATABASE_URL"),
        ({"PANDASYNC_DATABASE_URL": "postgresql+asyncpg://u@h"}, "must name a database"),
        ({"PANDASYNC_BROKER_URL": "kafka://h:9092"}, "PANDASYNC_BROKER_URL"),
        ({"PANDASYNC_API_BASE_URL": "ftp://x"}, "PANDASYNC_API_BASE_URL"),
        ({"PANDASYNC_WEBHOOK_AUTH": "hmac"}, "PANDASYNC_WEBHOOK_AUTH"),
        ({"PANDASYNC_WEBHOOK_AUTH": "token"}, "needs PANDASYNC_WEBHOOK_TOKEN"),
        (
            {"PANDASYNC_WEBHOOK_AUTH": "signature+token", "PANDASYNC_WEBHOOK_TOKEN": "short"},
            "at least 16 characters",
        ),
        ({"PANDASYNC_WEBHOOK_TOKEN": "short"}, "PANDASYNC_WEBHOOK_TOKEN: must be at least 16"),
        ({"PANDASYNC_WEBHOOK_TOKEN": "has/a/slash-0123456789"}, "part of a URL"),
        ({"PANDASYNC_TIMESTAMP_UNIT": "us"}, "PANDASYNC_TIMESTAMP_UNIT"),
        ({"PANDASYNC_MAX_BODY_BYTES": "0"}, "PANDASYNC_MAX_BODY_BYTES"),
        ({"PANDASYNC_PORT": "70000"}, "PANDASYNC_PORT"),
        ({"PANDASYNC_REPORTING_TIMEZONE": "Mars/Olympus"}, "unknown time zone"),
    ],
)
def test_invalid_values_fail_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings()
    assert str(info.value).startswith("invalid settings:")


def test_error_message_does_not_echo_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANDASYNC_DATABASE_URL", "mysql://user:hunter2@h/db")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "hunter2" not in str(info.value)
