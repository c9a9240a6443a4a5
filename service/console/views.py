"""How values read on a console page: times, ages, amounts, and an order's events in words.

An order's events say what ``pandasync order`` says of them; every field of the event's
record is listed below its line as well (the content of ``pandasync order --json``).
"""

from __future__ import annotations

import enum
import json
from dataclasses import fields, is_dataclass
from datetime import datetime, timedelta

from service.ledger.timeline import Event, at
from service.pandapon.signer import HEADER_ACCESS_KEY, HEADER_SIGNATURE

# Of a stored message's headers, the access key is shown cut short (it names the credential),
# and the secrets are never shown, should a row ever hold one (the receiver stores none).
MASKED_HEADERS = frozenset({HEADER_ACCESS_KEY})
HIDDEN_HEADERS = frozenset({HEADER_SIGNATURE, "authorization", "proxy-authorization", "cookie"})
# A body longer than this shows its beginning only.
BODY_SHOWN_BYTES = 256 * 1024


def age(value: timedelta | float | None) -> str:
    """``3 h 12 min``, ``41 s``: two units at most."""
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        seconds = 0.0
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    shown = [f"{n} {unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0 s"


def plain(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return at(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def detail_fields(event: Event) -> list[tuple[str, str]]:
    """Every field of the event's record, as (name, text)."""
    d = event.detail
    assert is_dataclass(d)
    return [(f.name, plain(getattr(d, f.name))) for f in fields(d)]


def shown_headers(headers: object) -> list[tuple[str, str]]:
    """A stored message's headers (the receiver never stores the signature, cookies or a
    proxy's credentials), the access key cut to its first four characters."""
    if not isinstance(headers, dict):
        return []
    shown = []
    for name in sorted(headers):
        if name.lower() in HIDDEN_HEADERS:
            continue
        value = str(headers[name])
        if name.lower() in MASKED_HEADERS:
            value = value[:4] + "…" if len(value) > 4 else "…"
        shown.append((str(name), value))
    return shown


def body_text(raw: bytes) -> tuple[str, str | None, bool]:
    """The body as text (invalid UTF-8 replaced), indented JSON when it is JSON, and whether
    it was cut at BODY_SHOWN_BYTES."""
    cut = len(raw) > BODY_SHOWN_BYTES
    shown = raw[:BODY_SHOWN_BYTES].decode("utf-8", errors="replace")
    pretty = None
    if not cut:
        try:
            pretty = json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
        except ValueError:
            pretty = None
    return shown, pretty, cut
