"""Each reconcile outcome is explained once, in code, and docs/operations.md says the same."""

from __future__ import annotations

import re
from pathlib import Path

from workers.reconcile import OUTCOME_DETAILS, Outcome

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_outcomes() -> dict[str, str]:
    """The rows of the "Reconcile outcomes" table: outcome word -> its explanation."""
    text = OPERATIONS.read_text()
    section = text.split("## Reconcile outcomes", 1)[1].split("\n## ", 1)[0]
    return {
        match.group(1): match.group(2).strip()
        for match in re.finditer(r"^\| `([a-z_]+)` \| (.+) \|$", section, re.MULTILINE)
    }


def test_every_outcome_has_an_explanation() -> None:
    assert set(OUTCOME_DETAILS) == set(Outcome)
    for outcome in Outcome:
        assert outcome.detail == OUTCOME_DETAILS[outcome]
        assert outcome.detail.strip()
        assert "\n" not in outcome.detail


def test_the_operations_table_is_the_mapping() -> None:
    assert documented_outcomes() == {o.value: d for o, d in OUTCOME_DETAILS.items()}
