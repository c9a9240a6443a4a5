"""What ``pandasync doctor`` found, as typed results, and how they are printed.

Each check ends in one ``Check``: a mark (✓ passed, ✗ failed, ? could not be checked), its
name, what it saw, the settings that would fix it and optional note lines. Rendering is kept
apart so tests assert on the results and the wording can change freely.

Exit status: 0 when every check passed, 1 when any failed, 2 when none failed but something
could not be checked.
"""

from __future__ import annotations

import enum
import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from service.pandapon.endpoints import OVERRIDES_SETTING

# What an operator must replace by hand in a printed override: we cannot know the real values.
PATH_PLACEHOLDER = "/…"
NAME_PLACEHOLDER = "<upstream name>"


class Mark(enum.StrEnum):
    OK = "✓"
    FAIL = "✗"
    UNKNOWN = "?"


@dataclass(frozen=True, slots=True)
class Fix:
    """A setting to set: ``<setting>=<value>``, ``setting`` spelled ``PANDASYNC_…``."""

    setting: str
    value: str


@dataclass(frozen=True, slots=True)
class OverrideFix:
    """One key of ``PANDASYNC_ENDPOINT_OVERRIDES``: ``{endpoint: {key: value}}``."""

    endpoint: str
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Check:
    mark: Mark
    name: str
    detail: str
    fixes: tuple[Fix | OverrideFix, ...] = ()
    notes: tuple[str, ...] = ()


def exit_code(checks: Iterable[Check]) -> int:
    marks = {check.mark for check in checks}
    if Mark.FAIL in marks:
        return 1
    if Mark.UNKNOWN in marks:
        return 2
    return 0


def render_check(check: Check) -> list[str]:
    lines = [f"{check.mark} {check.name}: {check.detail}"]
    lines.extend(f"    {note}" for note in check.notes)
    return lines


def overrides_assignment(overrides: Mapping[str, Mapping[str, str]]) -> str:
    """``PANDASYNC_ENDPOINT_OVERRIDES='{…}'``, ready for a shell or a .env file."""
    return f"{OVERRIDES_SETTING}={shlex.quote(json.dumps(overrides, ensure_ascii=False))}"


def settings_lines(
    checks: Sequence[Check], current_overrides: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """The ``PANDASYNC_…=…`` lines the failed checks ask for, each setting once.

    Endpoint overrides are merged into the ones already set, so the printed value replaces
    the current one without losing anything.
    """
    plain: dict[str, str] = {}
    overrides = {name: dict(entry) for name, entry in current_overrides.items()}
    changed = False
    for check in checks:
        for fix in check.fixes:
            if isinstance(fix, OverrideFix):
                overrides.setdefault(fix.endpoint, {})[fix.key] = fix.value
                changed = True
            else:
                plain.setdefault(fix.setting, fix.value)
    lines = [f"{name}={shlex.quote(value)}" for name, value in plain.items()]
    if changed:
        lines.append(overrides_assignment(overrides))
    return lines


def render_summary(
    checks: Sequence[Check], current_overrides: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """The end of the report: a count and the settings block."""
    lines: list[str] = []
    failed = sum(check.mark is Mark.FAIL for check in checks)
    unknown = sum(check.mark is Mark.UNKNOWN for check in checks)
    lines.append("")
    if not failed and not unknown:
        lines.append(f"all {len(checks)} checks passed")
    else:
        lines.append(f"{failed} failed, {unknown} not checked, of {len(checks)} checks")
    to_set = settings_lines(checks, current_overrides)
    if to_set:
        lines.append("set:")
        lines.extend(f"  {line}" for line in to_set)
        placeholders = [
            p for p in (PATH_PLACEHOLDER, NAME_PLACEHOLDER) if any(p in x for x in to_set)
        ]
        if placeholders:
            lines.append(
                f"  (replace {' and '.join(placeholders)} with what PandaPon documents or its "
                "support tells you: it cannot be guessed from here)"
            )
    return lines
