"""The sandbox's settings: environment prefix ``PANDASYNC_SANDBOX_``, read once at start.

The credentials, the timestamp unit and the endpoint overrides are the *service's* settings
(``PANDASYNC_ACCESS_KEY``, ``PANDASYNC_ACCESS_SECRET``, ``PANDASYNC_USER_ID``,
``PANDASYNC_TIMESTAMP_UNIT``, ``PANDASYNC_ENDPOINT_OVERRIDES``), so a service and a sandbox
started from the same environment agree. Unset credentials fall back to the fixed dev values
below, which ``pandasync dev`` uses too. Delivery and fault settings can be changed at runtime
through the control API (docs/sandbox.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.config import ConfigError, TimestampUnit
from service.pandapon.endpoints import ENDPOINT_NAMES

# Fixed dev credentials: public on purpose, only ever accepted by the sandbox.
DEV_ACCESS_KEY = "sandbox-key"
DEV_ACCESS_SECRET = "sandbox-secret"  # noqa: S105 - a documented dev value, not a secret
DEV_USER_ID = "sandbox-user"

CallbackStyle = Literal["platform", "flat"]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
ALL_ENDPOINTS = "*"


class FaultSpec(BaseModel):
    """Faults for one endpoint; each request draws once: timeout, else 429, else 5xx."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_s: NonNegative = 0.0  # added to every request
    timeout: Probability = 0.0  # share of requests that hang for ``timeout_s`` (or until closed)
    timeout_s: NonNegative = 30.0
    rate_limit: Probability = 0.0  # share answered HTTP 429 with Retry-After
    retry_after_s: Annotated[int, Field(ge=0)] = 1
    server_error: Probability = 0.0  # share answered with ``server_error_status``
    server_error_status: Annotated[int, Field(ge=500, le=599)] = 503


def check_fault_keys(faults: dict[str, FaultSpec]) -> dict[str, FaultSpec]:
    unknown = set(faults) - {ALL_ENDPOINTS, *ENDPOINT_NAMES}
    if unknown:
        raise ValueError(
            f"unknown endpoint(s) {sorted(unknown)}; use '*' or one of {', '.join(ENDPOINT_NAMES)}"
        )
    return faults


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

    seed: int = 0
    scenario_orders: Annotated[int, Field(ge=0)] = 0  # orders generated at start
    scenario_steps: Annotated[int, Field(ge=0)] = 4  # random changes per generated order

    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
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


def load_sandbox_settings(**overrides: object) -> SandboxSettings:
    """SandboxSettings from the environment (and overrides), or ConfigError naming the setting."""
    try:
        return SandboxSettings(**overrides)  # type: ignore[arg-type]
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
