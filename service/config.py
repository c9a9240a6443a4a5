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

from service.accounts import DEFAULT_ACCOUNT_NAME, Account, AccountsError, load_accounts_file

WebhookAuth = Literal["auto", "signature", "token", "signature+token"]
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
        description="`postgresql+asyncpg://…`; unset: an embedded Postgres under DATA_DIR.",
    )
    broker_url: str | None = Field(
        default=None,
        description="`redis://…` or `amqp://…`; unset: in-process (`pandasync dev` only).",
    )
    rate_limit_redis_url: str | None = Field(
        default=None,
        description=(
            "`redis://…` holding the shared upstream rate limit (a token bucket per account). "
            "Unset: the broker's Redis when BROKER_URL is `redis://`; with RabbitMQ, a row per "
            "account in Postgres (table `rate_limit_buckets`); with no broker, this process."
        ),
    )
    data_dir: Path = Field(
        default=Path(".pandasync"), description="Where the embedded Postgres keeps its data."
    )
    db_pool_size: PositiveInt = Field(
        default=10, description="Connections each process keeps open to Postgres."
    )
    db_max_overflow: Annotated[int, Field(ge=0)] = Field(
        default=10,
        description="Extra connections a process may open under load, above DB_POOL_SIZE.",
    )

    # --- PandaPon credentials and upstream ----------------------------------------------
    api_base_url: str = Field(
        default="https://api.pandapon.com",
        description="PandaPon's API root; point it at `pandasync sandbox` for tests and demos.",
    )
    access_key: str | None = Field(
        default=None, description="The PandaPon AccessKey (console: AccessKey management)."
    )
    access_secret: SecretStr | None = Field(
        default=None,
        description="The AccessKey's secret; signs requests and verifies callbacks. Secret.",
    )
    user_id: str | None = Field(
        default=None, description="The PandaPon user-id; also the ledger's account_id."
    )
    timestamp_unit: TimestampUnit = Field(
        default="ms",
        description="Unit of the `timestamp` header: `ms` (as in the docs' example) or `s`.",
    )
    endpoint_overrides: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            'JSON `{"taobao_order_detail": {"path": "/…", "method": "GET"}, …}` overriding '
            "entries of the endpoint table in service/pandapon/endpoints.py."
        ),
    )
    http_connect_timeout_s: PositiveFloat = Field(
        default=3.0, description="Upstream connect timeout, seconds."
    )
    http_read_timeout_s: PositiveFloat = Field(
        default=10.0,
        description="Upstream read timeout, seconds (well under the reconcile time limit).",
    )
    http_write_timeout_s: PositiveFloat = Field(
        default=5.0, description="Upstream write timeout, seconds."
    )
    http_pool_timeout_s: PositiveFloat = Field(
        default=5.0, description="Longest wait for a free upstream connection, seconds."
    )
    http_max_connections: PositiveInt = Field(
        default=20, description="Keep-alive connections to PandaPon per process."
    )
    upstream_rate_limit_rps: PositiveFloat = Field(
        default=20.0,
        description=(
            "Requests per second to PandaPon, shared by all workers (per account: an "
            "account's `rate_limit_rps` in ACCOUNTS_FILE overrides it)."
        ),
    )
    accounts_file: Path | None = Field(
        default=None,
        description=(
            "A TOML file listing several PandaPon accounts (docs/configuration.md, Several "
            "accounts); unset: the single-account settings above are the account `default`."
        ),
    )

    # --- webhook receiver ---------------------------------------------------------------
    host: str = Field(
        default="127.0.0.1",
        description="Interface the web role (and the worker/scheduler metrics) bind to.",
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=8000, description="Port of the web role."
    )
    web_workers: PositiveInt = Field(
        default=1, description="Web processes (`pandasync serve --workers`)."
    )
    public_url: str | None = Field(
        default=None,
        description=(
            "The web role's address as PandaPon reaches it, e.g. `https://sync.example.com`; "
            "used to print the webhook URL (`pandasync doctor`)."
        ),
    )
    webhook_auth: WebhookAuth = Field(
        default="auto",
        description=(
            "How callbacks are verified. `auto`: on `/webhooks/pandapon/{token}` the token "
            "authenticates and signatures are only checked and recorded; on "
            "`/webhooks/pandapon` a valid signature is required. `signature`, `token`, "
            "`signature+token`: strict, as named (docs/operations.md, First deploy)."
        ),
    )
    webhook_token: SecretStr | None = Field(
        default=None,
        description=(
            "Secret path token for `/webhooks/pandapon/{token}` (16+ URL-safe characters, e.g. "
            "`openssl rand -hex 24`): how PandaPon's callbacks should authenticate. Secret."
        ),
    )
    signature_tolerance_s: PositiveInt = Field(
        default=600, description="Accepted clock difference of a callback's `timestamp`, both ways."
    )
    max_body_bytes: PositiveInt = Field(
        default=1024 * 1024, description="Largest callback body accepted (413 above it)."
    )
    inbox_write_timeout_ms: PositiveInt = Field(
        default=400,
        description="Longest the receiver waits to store a message before answering 503.",
    )
    max_header_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=16 * 1024,
        description=(
            "Largest request head (request line and header fields; chunked trailers count "
            "too) the web role reads; 431 and the connection closed above it."
        ),
    )
    header_timeout_s: PositiveFloat = Field(
        default=10.0,
        description=(
            "Longest a client may take to send a request's head, from its connection or its "
            "first byte; then 408 and the connection closed."
        ),
    )
    body_timeout_s: PositiveFloat = Field(
        default=10.0,
        description=(
            "Longest a client may take to send a request's body after its head; then 408 "
            "and the connection closed."
        ),
    )
    max_connections: PositiveInt = Field(
        default=256,
        description=(
            "Connections each web process holds at once (uvicorn `limit_concurrency`); a "
            "request beyond them gets 503."
        ),
    )
    keep_alive_timeout_s: PositiveInt = Field(
        default=5, description="How long an idle keep-alive connection stays open, seconds."
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description=(
            "Turns on the operator console at `/console` of the web role (16+ characters, e.g. "
            "`openssl rand -hex 24`); its login form asks for it. Unset: the console is off "
            "(docs/operations.md, The console). Secret."
        ),
    )

    # --- outbound webhooks --------------------------------------------------------------
    outbound_timeout_s: PositiveFloat = Field(
        default=5.0,
        description="How long one outbound webhook delivery may take (connect to answer), seconds.",
    )
    outbound_concurrency: PositiveInt = Field(
        default=8,
        description="Outbound webhook deliveries in flight at once (`pandasync deliver`).",
    )
    outbound_poll_interval_s: PositiveFloat = Field(
        default=0.5,
        description="How often `pandasync deliver` looks for new changes and due deliveries.",
    )
    outbound_retry_schedule_s: list[PositiveFloat] = Field(
        default=[5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description=(
            "Seconds before each retry of a failed delivery (JSON list, ±20% jitter); after "
            "the last one the delivery is `failed` (replay sends it again)."
        ),
    )
    outbound_disable_after_s: PositiveFloat = Field(
        default=259200.0,
        description=(
            "An endpoint whose every attempt has failed for this long is disabled "
            "(`pandasync endpoints enable` turns it back on)."
        ),
    )
    outbound_retention_days: PositiveFloat = Field(
        default=30.0,
        description=(
            "Delivered and failed outbound deliveries, with their attempts, are deleted this "
            "many days after they were made (`pandasync deliver`, hourly); pending ones are "
            "kept. `pandasync endpoints replay --since` sends from the change feed, whatever "
            "their age."
        ),
    )

    # --- workers and scheduler ----------------------------------------------------------
    worker_processes: PositiveInt = Field(
        default=2, description="Worker processes (`pandasync worker --processes`)."
    )
    worker_threads: PositiveInt = Field(
        default=4, description="Threads per worker process (`pandasync worker --threads`)."
    )
    reconcile_upstream_budget_s: PositiveFloat = Field(
        default=15.0,
        description=(
            "Longest one reconcile spends in upstream calls (rate-limit waits not counted), "
            "seconds; then its message is retried later and the worker thread moves on."
        ),
    )
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9191, description="Prometheus port of the worker role (0: none)."
    )
    scheduler_metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9192, description="Prometheus port of the scheduler role (0: none)."
    )
    relay_interval_s: PositiveFloat = Field(
        default=5.0, description="How often the relay looks for stored messages not yet handed off."
    )
    relay_grace_s: PositiveFloat = Field(
        default=10.0, description="Age after which a stored but not handed-off message is relayed."
    )
    requeue_after_s: PositiveFloat = Field(
        default=300.0,
        description=(
            "A handed-off message not processed once the broker's queue has moved this far "
            "past it is handed off again (the broker lost it: a restart without persistence, "
            "a killed worker)."
        ),
    )
    sweep_interval_s: PositiveFloat = Field(
        default=900.0, description="How often each platform's order list is swept."
    )
    sweep_lookback_s: PositiveFloat = Field(
        default=86400.0, description="How far before the stored cursor a sweep starts again."
    )
    refund_sweep_interval_s: PositiveFloat = Field(
        default=900.0, description="How often each platform's refund (after-sales) list is swept."
    )
    refund_sweep_lookback_s: PositiveFloat = Field(
        default=86400.0,
        description="How far before the stored cursor a refund sweep starts again.",
    )
    refresh_interval_s: PositiveFloat = Field(
        default=3600.0, description="How often non-final orders are looked at again."
    )
    refresh_stale_hours: PositiveFloat = Field(
        default=6.0, description="A non-final order not synced for this long is reconciled again."
    )

    # --- payments -----------------------------------------------------------------------
    payments_enabled: bool = Field(
        default=False,
        description=(
            "Let `pandasync pay --yes` pay orders through PandaPon (moves money; "
            "docs/operations.md, Paying orders). Off: only the dry run works."
        ),
    )

    # --- reporting and logs -------------------------------------------------------------
    reporting_timezone: str = Field(
        default="Asia/Shanghai",
        description="Time zone of the `day` columns of the report views (IANA name).",
    )
    reporting_statement_timeout_s: Annotated[int, Field(ge=0)] = Field(
        default=60,
        description=(
            "`statement_timeout` of `pandasync_reporting` and its logins, seconds (0: none); "
            "set by `pandasync migrate` (docs/reporting.md, Access)."
        ),
    )
    reporting_idle_in_transaction_timeout_s: Annotated[int, Field(ge=0)] = Field(
        default=300,
        description=(
            "`idle_in_transaction_session_timeout` of `pandasync_reporting` and its logins, "
            "seconds (0: none); set by `pandasync migrate`."
        ),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR."
    )
    log_format: LogFormat = Field(
        default="auto",
        description="`json`, `console`, or `auto` (console on a terminal, JSON otherwise).",
    )

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

    @field_validator("rate_limit_redis_url")
    @classmethod
    def _check_rate_limit_redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("must be a redis://host:port/db URL")
        return value

    @field_validator("api_base_url")
    @classmethod
    def _check_api_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s):// URL")
        return value.rstrip("/")

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s):// URL, e.g. https://sync.example.com")
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

    @field_validator("webhook_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        token = value.get_secret_value()
        if len(token) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        # It is one path segment of the webhook URL: anything else would need escaping there.
        if not all(c.isascii() and (c.isalnum() or c in "-_.~") for c in token):
            raise ValueError("may hold only letters, digits and - _ . ~ (it is part of a URL)")
        return value

    @field_validator("accounts_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_webhook_token(self) -> Settings:
        # With an accounts file the tokens are the file's (checked by ``accounts()``).
        if self.accounts_file is not None:
            return self
        if "token" in self.webhook_auth and self.webhook_token is None:
            raise ValueError(
                f"PANDASYNC_WEBHOOK_AUTH={self.webhook_auth} needs PANDASYNC_WEBHOOK_TOKEN "
                "of at least 16 characters"
            )
        return self

    @property
    def has_credentials(self) -> bool:
        """True when every account's access key, secret and user id are set."""
        if self.accounts_file is not None:
            return True  # the file's accounts always have them (``accounts()`` checks)
        return bool(self.access_key and self.access_secret and self.user_id)

    def accounts(self) -> tuple[Account, ...]:
        """Every account this deployment serves, in the file's order (or the one ``default``
        account of the single-account settings). Raises ConfigError naming each problem."""
        # Computed once per Settings (a frozen model); keyed by what it is made of, so a
        # ``model_copy(update=...)`` (which copies the cache along) never answers stale.
        key = (
            self.accounts_file,
            self.user_id,
            self.access_key,
            self.access_secret,
            self.webhook_token,
            self.webhook_auth,
        )
        cached: tuple[object, tuple[Account, ...]] | None = self.__dict__.get("_accounts_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._load_accounts())
            self.__dict__["_accounts_cache"] = cached
        return cached[1]

    def for_account(self, account: Account) -> Settings:
        """These settings as a single-account deployment of ``account`` (its credentials,
        token, base URL and rate), for code that serves one account at a time (the doctor)."""
        if not account.in_file:
            return self
        return self.model_copy(
            update={
                "accounts_file": None,
                "user_id": account.user_id,
                "access_key": account.access_key,
                "access_secret": account.access_secret,
                "webhook_token": account.webhook_token,
                "api_base_url": account.api_base_url or self.api_base_url,
                "upstream_rate_limit_rps": account.rate_limit_rps or self.upstream_rate_limit_rps,
            }
        )

    def _load_accounts(self) -> tuple[Account, ...]:
        if self.accounts_file is None:
            return (
                Account(
                    name=DEFAULT_ACCOUNT_NAME,
                    user_id=self.user_id,
                    access_key=self.access_key,
                    access_secret=self.access_secret,
                    webhook_token=self.webhook_token,
                ),
            )
        single = [
            f"PANDASYNC_{name.upper()}"
            for name in ("user_id", "access_key", "access_secret", "webhook_token")
            if getattr(self, name) is not None
        ]
        if single:
            raise ConfigError(
                f"invalid settings:\n  PANDASYNC_ACCOUNTS_FILE and {', '.join(single)} are both "
                "set: with an accounts file every account's credentials are in the file; unset "
                + ("them" if len(single) > 1 else "it")
            )
        try:
            accounts = load_accounts_file(self.accounts_file)
        except AccountsError as error:
            raise ConfigError(
                "invalid accounts file:\n" + "\n".join(f"  {line}" for line in error.lines)
            ) from None
        if "token" in self.webhook_auth:
            missing = [a.name for a in accounts if a.webhook_token is None]
            if missing:
                raise ConfigError(
                    "invalid accounts file:\n"
                    + "\n".join(
                        f"  {self.accounts_file}: [{name}] webhook_token: missing "
                        f"(PANDASYNC_WEBHOOK_AUTH={self.webhook_auth} needs one per account)"
                        for name in missing
                    )
                )
        return tuple(accounts)


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
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(describe_errors(error)) from None
    settings.accounts()  # an accounts file's problems stop the start too
    return settings


@functools.cache
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()


def settings_reference() -> str:
    """The Markdown table of every setting, as published in docs/configuration.md."""
    rows = ["| variable | default | what it is for |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, Path):
            shown = f"`{default}`"
        elif default is None or default == {}:
            shown = "unset"
        else:
            shown = f"`{default}`"
        description = (info.description or "").replace("|", "\\|")
        rows.append(f"| `PANDASYNC_{name.upper()}` | {shown} | {description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")  # regenerates the table of docs/configuration.md
