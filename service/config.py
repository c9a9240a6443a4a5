"""The one Settings object: every knob of pandasync, read once from the environment.

Environment variables carry the prefix ``PANDASYNC_`` (``PANDASYNC_DATABASE_URL`` …); a ``.env``
file in the working directory is read too. Secrets are ``SecretStr`` so they never show in a
``repr`` or a log line. An invalid value stops startup with a message naming the setting
(see :func:`load_settings`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

WebhookAuth = Literal["signature", "token", "signature+token"]
TimestampUnit = Literal["ms", "s"]
LogFormat = Literal["auto", "json", "console"]

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(Exception):
    """Settings could not be loaded; the message names each bad setting and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PANDASYNC_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- storage and broker -------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="postgresql+asyncpg://… ; unset: an embedded Postgres under DATA_DIR.",
    )
    broker_url: str | None = Field(
        default=None, description="redis://… or amqp://… ; unset: an in-process broker."
    )
    data_dir: Path = Field(
        default=Path(".pandasync"), description="Where the embedded Postgres keeps its data."
    )
    db_pool_size: PositiveInt = 10
    db_max_overflow: Annotated[int, Field(ge=0)] = 10

    # --- PandaPon credentials and upstream ----------------------------------------------
    api_base_url: str = "https://api.pandapon.com"
    access_key: str | None = None
    access_secret: SecretStr | None = None
    user_id: str | None = Field(
        default=None, description="The PandaPon user-id; also the ledger's account_id."
    )
    timestamp_unit: TimestampUnit = "ms"
    endpoint_overrides: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            'JSON: {"taobao_order_detail": {"path": "/…", "method": "GET"}, …} overriding '
            "entries of the endpoint table in service/pandapon/endpoints.py."
        ),
    )
    http_connect_timeout_s: PositiveFloat = 3.0
    http_read_timeout_s: PositiveFloat = 10.0
    http_write_timeout_s: PositiveFloat = 5.0
    http_pool_timeout_s: PositiveFloat = 5.0
    http_max_connections: PositiveInt = 20
    upstream_rate_limit_rps: PositiveFloat = Field(
        default=20.0, description="Requests per second to PandaPon, shared by all workers."
    )

    # --- webhook receiver ---------------------------------------------------------------
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    web_workers: PositiveInt = 1
    webhook_auth: WebhookAuth = "signature"
    webhook_token: SecretStr | None = None
    signature_tolerance_s: PositiveInt = 600
    max_body_bytes: PositiveInt = 1024 * 1024
    inbox_write_timeout_ms: PositiveInt = Field(
        default=400,
        description="Longest the receiver waits to store a message before answering 503.",
    )
    admin_token: SecretStr | None = None

    # --- workers and scheduler ----------------------------------------------------------
    worker_processes: PositiveInt = 2
    worker_threads: PositiveInt = 4
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9191
    scheduler_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9192
    relay_interval_s: PositiveFloat = 5.0
    relay_grace_s: PositiveFloat = Field(
        default=10.0, description="Age after which a stored but not handed-off message is relayed."
    )
    sweep_interval_s: PositiveFloat = 900.0
    sweep_lookback_s: PositiveFloat = 86400.0
    refresh_interval_s: PositiveFloat = 3600.0
    refresh_stale_hours: PositiveFloat = 6.0

    # --- reporting and logs -------------------------------------------------------------
    reporting_timezone: str = "Asia/Shanghai"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: LogFormat = "auto"

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme != "postgresql+asyncpg":
            raise ValueError("must be a postgresql+asyncpg://user@host:port/db URL")
        if not parts.path.strip("/") and "host=" not in parts.query:
            raise ValueError("must name a database, e.g. postgresql+asyncpg://u@h:5432/pandasync")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "amqp", "amqps") or not parts.hostname:
            raise ValueError("must be a redis://host:port/db or amqp://user@host/vhost URL")
        return value

    @field_validator("api_base_url")
    @classmethod
    def _check_api_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s):// URL")
        return value.rstrip("/")

    @field_validator("reporting_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check_webhook_token(self) -> Settings:
        if "token" in self.webhook_auth:
            token = self.webhook_token.get_secret_value() if self.webhook_token else ""
            if len(token) < 16:
                raise ValueError(
                    f"PANDASYNC_WEBHOOK_AUTH={self.webhook_auth} needs PANDASYNC_WEBHOOK_TOKEN "
                    "of at least 16 characters"
                )
        return self

    @property
    def has_credentials(self) -> bool:
        """True when the PandaPon access key, secret and user id are all set."""
        return bool(self.access_key and self.access_secret and self.user_id)


def describe_errors(error: ValidationError) -> str:
    """One line per invalid setting, naming the environment variable; values are not echoed."""
    lines = []
    for item in error.errors():
        name = "PANDASYNC_" + "_".join(str(p) for p in item["loc"]).upper() if item["loc"] else ""
        msg = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"  {name or 'settings'}: {msg}")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment (and overrides), or raise ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(describe_errors(error)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()
