"""The sandbox's settings: environment prefix ``PANDASYNC_SANDBOX_``, read once at start.

The credentials, the timestamp unit and the endpoint overrides are the *service's* settings
(``PANDASYNC_ACCESS_KEY``, ``PANDASYNC_ACCESS_SECRET``, ``PANDASYNC_USER_ID``,
``PANDASYNC_TIMESTAMP_UNIT``, ``PANDASYNC_ENDPOINT_OVERRIDES``), so a service and a sandbox
started from the same environment agree. Unset credentials fall back to the fixed dev values
below, which ``pandasync dev`` uses too. ``PANDASYNC_SANDBOX_ACCOUNTS`` replaces that one account
with several, each with its own keys, world and callback URL, served by the one host as PandaPon
serves many accounts. Delivery, fault and upstream-variant settings can be changed at runtime
through the control API (docs/sandbox.md).

The variants (``upstream`` and the signing fields of ``delivery``) make the sandbox behave as the
real PandaPon might where the contract is a guess: another timestamp unit, endpoints at other
paths, Taobao payloads in Taobao Global's snake_case, callbacks signed another way or not at all.
Unset, the sandbox behaves as docs/upstream.md assumes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from service.config import ConfigError, TimestampUnit
from service.pandapon.endpoints import ENDPOINT_NAMES

# Fixed dev credentials: public on purpose, only ever accepted by the sandbox.
DEV_ACCESS_KEY = "sandbox-key"
DEV_ACCESS_SECRET = "sandbox-secret"  # noqa: S105 - a documented dev value, not a secret
DEV_USER_ID = "sandbox-user"
# The second account of ``pandasync dev --demo`` (the first is the dev account above, so a data
# directory of a plain ``pandasync dev`` and ``send-test-message`` stay valid). Public too.
DEMO_B_ACCESS_KEY = "sandbox-key-b"
DEMO_B_ACCESS_SECRET = "sandbox-secret-b"  # noqa: S105 - a documented dev value, not a secret
DEMO_B_USER_ID = "sandbox-user-b"

CONTROL_PREFIX = "/_sandbox"

CallbackStyle = Literal["platform", "flat"]
CallbackSigning = Literal["md5", "none", "other_secret", "hmac_sha256"]
PayloadCase = Literal["camel", "snake"]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
ALL_ENDPOINTS = "*"


class FaultSpec(BaseModel):
    """Faults for one endpoint; each request draws once: timeout, else 429, else 5xx, else the
    poisoned errors (a 429 asking for a day, a 5xx whose text Postgres cannot store). An order
    detail that draws none may then be poisoned but parseable: a modification time in the
    year 9999, or a negative total."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_s: NonNegative = 0.0  # added to every request
    timeout: Probability = 0.0  # share of requests that hang for ``timeout_s`` (or until closed)
    timeout_s: NonNegative = 30.0
    rate_limit: Probability = 0.0  # share answered HTTP 429 with Retry-After
    retry_after_s: Annotated[int, Field(ge=0)] = 1
    server_error: Probability = 0.0  # share answered with ``server_error_status``
    server_error_status: Annotated[int, Field(ge=500, le=599)] = 503
    huge_retry_after: Probability = 0.0  # share answered 429 with Retry-After: 86400
    unstorable_error: Probability = 0.0  # share answered 5xx with a NUL and a 300-char requestId
    far_future: Probability = 0.0  # share of order details modified "9999-12-30"
    negative_amount: Probability = 0.0  # share of order details with a negative total


def check_endpoint_names(keys: dict[str, Any], *, allow_all: bool = False) -> None:
    """ValueError naming any key that is not an endpoint of the table (nor ``*``, if allowed)."""
    unknown = set(keys) - set(ENDPOINT_NAMES) - ({ALL_ENDPOINTS} if allow_all else set())
    if unknown:
        choices = ("'*' or one of " if allow_all else "one of ") + ", ".join(ENDPOINT_NAMES)
        raise ValueError(f"unknown endpoint(s) {sorted(unknown)}; use {choices}")


def check_fault_keys(faults: dict[str, FaultSpec]) -> dict[str, FaultSpec]:
    check_endpoint_names(faults, allow_all=True)
    return faults


class EndpointMove(BaseModel):
    """Serve one endpoint at another path and/or method instead of the table's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    method: Literal["GET", "POST"] | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith("/") or any(c in value for c in " ?#\t\n"):
            raise ValueError("must start with '/' and hold no query, fragment or space")
        if value == CONTROL_PREFIX or value.startswith(CONTROL_PREFIX + "/"):
            raise ValueError(f"must not be under {CONTROL_PREFIX}, the control API")
        return value


class UpstreamVariant(BaseModel):
    """How the upstream side departs from the contract's assumptions (all off by default)."""

    model_config = ConfigDict(extra="forbid")

    # the unit accepted in a request's ``timestamp`` header; None: PANDASYNC_TIMESTAMP_UNIT
    timestamp_unit: TimestampUnit | None = None
    # endpoint name -> where it is served instead (routing is looked up per request)
    endpoints: dict[str, EndpointMove] = Field(default_factory=dict)
    # "snake": Taobao payloads in Taobao Global's field names (docs/upstream.md#evidence)
    payload_case: PayloadCase = "camel"

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: dict[str, EndpointMove]) -> dict[str, EndpointMove]:
        check_endpoint_names(value)
        return value


class DeliverySettings(BaseModel):
    """How callbacks reach the webhook: PandaPon's retry rule, plus seeded misbehaviour."""

    model_config = ConfigDict(extra="forbid")

    webhook_url: str | None = None
    callback_style: CallbackStyle = "platform"
    body_as_string: bool = False  # messageBody as a JSON-encoded string (white-label copy)
    drop: Probability = 0.0
    duplicate: Probability = 0.0
    reorder: Probability = 0.0  # held back until the next message has gone
    delay: Probability = 0.0
    delay_s: NonNegative = 1.0
    reorder_hold_s: NonNegative = 2.0  # a held message goes anyway after this long
    retry_interval_s: NonNegative = 0.2  # PandaPon waits 30 min; compressed for tests
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5  # PandaPon: 5
    timeout_s: Annotated[float, Field(gt=0)] = 1.0  # PandaPon wants 200 within 1000 ms
    concurrency: Annotated[int, Field(ge=1, le=256)] = 16
    # md5: the five request headers; none: no auth headers; other_secret: those headers signed
    # with a secret not ours; hmac_sha256: ``authorization`` (base64 HMAC-SHA256 of
    # access key + body) and ``timestamp`` only, as Taobao Global's gateway signs
    signing: CallbackSigning = "md5"
    timestamp_unit: TimestampUnit | None = None  # None: the unit the upstream side accepts
    # added to the callback's ``timestamp`` header; negative: late (a stale signature)
    timestamp_skew_s: Annotated[float, Field(ge=-1e9, le=1e9, allow_inf_nan=False)] = 0.0


class SandboxAccount(BaseModel):
    """One PandaPon account the sandbox serves: its keys, and where its callbacks go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: str
    access_key: str
    access_secret: SecretStr
    # None: the delivery settings' ``webhook_url``
    callback_url: str | None = None

    @field_validator("user_id", "access_key")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("access_secret")
    @classmethod
    def _secret_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @field_validator("callback_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


def check_accounts(accounts: list[SandboxAccount]) -> list[SandboxAccount]:
    """ValueError when two accounts share a user-id or an access key (requests could not be told
    apart)."""
    for name in ("user_id", "access_key"):
        values = [getattr(a, name) for a in accounts]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"two accounts with the same {name}: {', '.join(twice)}")
    return accounts


class SandboxSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PANDASYNC_SANDBOX_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
    )

    access_key: str = Field(default=DEV_ACCESS_KEY, validation_alias="PANDASYNC_ACCESS_KEY")
    access_secret: SecretStr = Field(
        default=SecretStr(DEV_ACCESS_SECRET), validation_alias="PANDASYNC_ACCESS_SECRET"
    )
    user_id: str = Field(default=DEV_USER_ID, validation_alias="PANDASYNC_USER_ID")
    timestamp_unit: TimestampUnit = Field(default="ms", validation_alias="PANDASYNC_TIMESTAMP_UNIT")
    endpoint_overrides: dict[str, dict[str, str]] = Field(
        default_factory=dict, validation_alias="PANDASYNC_ENDPOINT_OVERRIDES"
    )
    signature_tolerance_s: Annotated[int, Field(gt=0)] = 600  # PandaPon's documented window
    # JSON list; empty: the one account of the credentials above
    accounts: list[SandboxAccount] = Field(default_factory=list)

    seed: int = 0
    scenario_orders: Annotated[int, Field(ge=0)] = 0  # orders generated at start
    scenario_steps: Annotated[int, Field(ge=0)] = 4  # random changes per generated order

    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    upstream: UpstreamVariant = Field(default_factory=UpstreamVariant)
    # JSON {"*": {...}, "taobao_logistics": {...}}: per-endpoint faults, "*" for all others.
    faults: dict[str, FaultSpec] = Field(default_factory=dict)

    @field_validator("faults")
    @classmethod
    def _check_faults(cls, value: dict[str, FaultSpec]) -> dict[str, FaultSpec]:
        return check_fault_keys(value)

    @field_validator("access_key", "user_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("accounts")
    @classmethod
    def _check_accounts(cls, value: list[SandboxAccount]) -> list[SandboxAccount]:
        return check_accounts(value)

    def account_list(self) -> list[SandboxAccount]:
        """The accounts served, the first being the default of the control API: ``accounts``,
        or the one of the credentials settings."""
        if self.accounts:
            return list(self.accounts)
        return [
            SandboxAccount(
                user_id=self.user_id, access_key=self.access_key, access_secret=self.access_secret
            )
        ]


def load_sandbox_settings(**overrides: object) -> SandboxSettings:
    """SandboxSettings from the environment (and overrides), or ConfigError naming the setting."""
    try:
        return SandboxSettings(**overrides)  # type: ignore[arg-type]
    except SettingsError as error:  # a JSON setting that is not JSON
        match = re.search(r'field "(\w+)"', str(error))
        name = "PANDASYNC_SANDBOX_" + (match.group(1).upper() if match else "…")
        raise ConfigError(f"invalid sandbox settings:\n  {name}: not valid JSON") from None
    except ValidationError as error:
        lines = []
        for item in error.errors():
            loc = [str(part) for part in item["loc"]]
            if not loc:
                name = "sandbox settings"
            elif loc[0].startswith("PANDASYNC_"):
                name = "__".join(loc).upper()
            else:
                name = "PANDASYNC_SANDBOX_" + "__".join(loc).upper()
            lines.append(f"  {name}: {str(item['msg']).removeprefix('Value error, ')}")
        raise ConfigError("invalid sandbox settings:\n" + "\n".join(lines)) from None
