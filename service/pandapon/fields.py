"""The reader kit of the mapping: JSON, times, money, and field readers that name the field they
could not understand (``MalformedResponse.field``) and read every spelling of a field.

``record_missing()`` lists the fields the readers looked for and did not find (see
``service.pandapon.mapping``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from service.pandapon.errors import MalformedResponse
from service.pandapon.models import (
    ShipmentEventSnapshot,
)

CST = timezone(timedelta(hours=8), "CST")
DEFAULT_CURRENCY = "CNY"


# --- JSON, times, money -------------------------------------------------------------------------


def parse_json(content: bytes | str) -> Any:
    """JSON with decimals as ``Decimal``, so amounts never pass through ``float``."""
    return json.loads(content, parse_float=Decimal)


def jsonable(value: Any) -> Any:
    """``value`` with every ``Decimal`` turned back into a JSON number, for ``raw``."""
    if isinstance(value, Decimal):  # parse_float only ever made these from JSON decimals
        return float(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


_ALIBABA_TIME = re.compile(r"^(\d{14})(\d{3})?([+-]\d{4})?$")
# An epoch number below this is in seconds ([TG] writes 10 digits), at or above in milliseconds.
EPOCH_SECONDS_BELOW = 10**11


def parse_time(value: str | int) -> datetime:
    """An upstream time as an aware datetime; ValueError when it is none of the known forms.

    Epoch numbers (or all-digit text of 10 or 13 digits) are milliseconds, or seconds when they
    are below 10^11 (10 digits until the year 5138; milliseconds that small are before 1973).
    """
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, str) and value.isdigit() and len(value) in (10, 13):
        value = int(value)
    if isinstance(value, int):
        if -EPOCH_SECONDS_BELOW < value < EPOCH_SECONDS_BELOW:
            return datetime.fromtimestamp(value, UTC)
        return datetime.fromtimestamp(value / 1000, UTC)
    if not isinstance(value, str):
        raise ValueError("not a time")
    text = value.strip()
    match = _ALIBABA_TIME.match(text)
    if match:
        stamp, millis, offset = match.groups()
        parsed = datetime.strptime(stamp, "%Y%m%d%H%M%S")
        parsed = parsed.replace(microsecond=int(millis or 0) * 1000)
        if offset is None:
            return parsed.replace(tzinfo=CST)
        return parsed.replace(tzinfo=datetime.strptime(offset, "%z").tzinfo)
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=CST)


def format_request_time(moment: datetime) -> str:
    """``yyyy-MM-dd HH:mm:ss`` in China Standard Time, as the order-list queries take it."""
    if moment.tzinfo is None:
        raise ValueError("an aware datetime is required")
    return moment.astimezone(CST).strftime("%Y-%m-%d %H:%M:%S")


def fen_to_yuan(fen: int) -> Decimal:
    return Decimal(fen).scaleb(-2)


def event_key(event_at: datetime | None, status: str | None, description: str | None) -> str:
    """The natural key of a trace event: a SHA-256 hex digest of its time, status and text.

    The time is taken in UTC so the same moment gives the same key however it was written.
    """
    moment = event_at.astimezone(UTC).isoformat() if event_at else ""
    payload = "\x1f".join((moment, status or "", description or ""))
    return hashlib.sha256(payload.encode()).hexdigest()


# --- field readers: each names the field it could not understand --------------------------------

# The active collector of ``record_missing``, or None (the workers' case).
_missing: ContextVar[list[str] | None] = ContextVar("pandasync_mapping_missing", default=None)


@contextmanager
def record_missing() -> Iterator[list[str]]:
    """Collect, in reading order, the field paths (``records[0].subOrders[1].quantity``) that
    the mappings called inside the block looked for and found absent (a key present with a null
    value is not absent). Mapping results are unchanged."""
    found: list[str] = []
    token = _missing.set(found)
    try:
        yield found
    finally:
        _missing.reset(token)


def note_absent(obj: Mapping[str, Any], key: str, path: str) -> None:
    """Called by the readers on their None branch only, so a present field costs nothing."""
    collector = _missing.get()
    if collector is not None and key not in obj:
        collector.append(field_path(path, key))


def field_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def spelling(obj: Mapping[str, Any], names: tuple[str, ...]) -> str:
    """Which of a field's spellings to read in ``obj``: the first of ``names`` with a value,
    else the first present (null), else the first name.

    The readers then note an absence once, under the first name, and only when every spelling
    is absent. Costs one lookup when the first name has a value (the common case); the others
    are looked at only when it has none.
    """
    first = names[0]
    if obj.get(first) is not None:
        return first
    present = first if first in obj else None
    for name in names[1:]:
        if obj.get(name) is not None:
            return name
        if present is None and name in obj:
            present = name
    return present or first


def malformed(path: str, key: str, why: str) -> MalformedResponse:
    name = field_path(path, key)
    return MalformedResponse(f"cannot understand {name}: {why}", field=name)


def as_object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        name = path or "data"
        raise MalformedResponse(f"cannot understand {name}: not an object", field=name)
    return value


def req_object(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        note_absent(obj, key, path)
        raise malformed(path, key, "missing")
    if not isinstance(value, dict):
        raise malformed(path, key, "not an object")
    return value


def opt_object(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        note_absent(obj, key, path)
        return {}
    if not isinstance(value, dict):
        raise malformed(path, key, "not an object")
    return value


def req_list(obj: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        note_absent(obj, key, path)
        return []
    if not isinstance(value, list):
        raise malformed(path, key, "not a list")
    return value


def opt_str(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None:
        note_absent(obj, key, path)
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise malformed(path, key, "not a string")
    text = str(value).strip()
    return text or None


def req_str(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = opt_str(obj, key, path)
    if value is None:
        raise malformed(path, key, "missing")
    return value


def opt_int(obj: Mapping[str, Any], key: str, path: str) -> int | None:
    value = obj.get(key)
    if value is None:
        note_absent(obj, key, path)
        return None
    if isinstance(value, bool):
        raise malformed(path, key, "not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise malformed(path, key, "not an integer")


def fen(obj: Mapping[str, Any], key: str, path: str) -> Decimal | None:
    fen = opt_int(obj, key, path)
    return None if fen is None else fen_to_yuan(fen)


def yuan(obj: Mapping[str, Any], key: str, path: str) -> Decimal | None:
    value = obj.get(key)
    if value is None or value == "":
        note_absent(obj, key, path)
        return None
    if isinstance(value, bool):
        raise malformed(path, key, "not an amount")
    try:
        if isinstance(value, float):  # from a caller that parsed JSON without parse_json
            return Decimal(repr(value))
        if isinstance(value, int | Decimal | str):
            amount = Decimal(value)
            if amount.is_finite():
                return amount
    except InvalidOperation:
        pass
    raise malformed(path, key, "not an amount")


def opt_time(obj: Mapping[str, Any], key: str, path: str) -> datetime | None:
    value = obj.get(key)
    # [TG] writes an epoch 0 for a time that has not come yet (pay_time of an unpaid order).
    if value is None or value == "" or value == "0" or (value == 0 and value is not False):
        note_absent(obj, key, path)
        return None
    try:
        return parse_time(value)
    except (ValueError, TypeError):
        raise malformed(path, key, "not a time") from None


def at_index(path: str, index: int) -> str:
    return f"{path}[{index}]"


def sort_events(events: Iterable[ShipmentEventSnapshot]) -> tuple[ShipmentEventSnapshot, ...]:
    """Events oldest first, each natural key once (upstream sometimes repeats a step)."""
    unique: dict[str, ShipmentEventSnapshot] = {}
    for event in events:
        unique.setdefault(event.event_key, event)
    far_future = datetime.max.replace(tzinfo=UTC)
    return tuple(sorted(unique.values(), key=lambda e: e.event_at or far_future))
