"""The receiver's refusal reasons: one list in the code, every one used there, the docs' table
generated from it."""

from __future__ import annotations

import re
from pathlib import Path

from service.webhooks import metrics
from service.webhooks.reasons import BY_NAME, REASON_NAMES, REASONS, reasons_table

ROOT = Path(__file__).resolve().parents[2]
# Where a reason is given: the webhook errors' first argument, a signature check's reason, the
# inbox writer's failures and the endpoint's own counts.
SOURCES = [
    *sorted((ROOT / "service" / "webhooks").glob("*.py")),
    ROOT / "service/pandapon/signer.py",
]
_ERRORS = (
    "Rejected|PayloadTooLarge|UnsupportedMediaType|MalformedRequest|VerificationFailed"
    "|RequestTimeout|StoreUnavailable|WebhookError"
)
_USES = (
    re.compile(rf'\b(?:{_ERRORS})\(\s*"([a-z_]+)"'),
    re.compile(r'SignatureCheck\(\s*SignatureState\.[A-Z]+,\s*"([a-z_]+)"'),
    re.compile(r'metrics\.rejected\("([a-z_]+)"\)'),
    re.compile(r'self\._fail\([^,]+,\s*"([a-z_]+)"'),
)


def reasons_in_code() -> set[str]:
    found: set[str] = set()
    for path in SOURCES:
        if path.name == "reasons.py":
            continue
        text = path.read_text()
        for pattern in _USES:
            found |= set(pattern.findall(text))
    return found


def test_every_reason_the_code_gives_is_listed() -> None:
    used = reasons_in_code()
    # The scan finds each way a reason is given (a guard against a scan that finds nothing).
    assert {"payload_too_large", "bad_signature", "client_disconnected", "store_timeout"} <= used
    assert not used - set(REASON_NAMES), (
        f"not in service/webhooks/reasons.py: {used - set(REASON_NAMES)}"
    )


def test_every_listed_reason_is_given_somewhere() -> None:
    assert set(REASON_NAMES) == reasons_in_code()


def test_reasons_are_unique_and_complete() -> None:
    assert len(REASON_NAMES) == len(set(REASON_NAMES)) == len(BY_NAME)
    for reason in REASONS:
        assert re.fullmatch(r"[a-z_]+", reason.name)
        # One table cell each: a "|" or a line break would break the Markdown table.
        for text in (reason.answer, reason.meaning, reason.fix):
            assert text.strip()
            assert "|" not in text
            assert "\n" not in text


def test_the_metric_counts_every_listed_reason_under_its_own_label() -> None:
    assert metrics.REJECT_REASONS == REASON_NAMES
    assert set(metrics.REJECTED_BY_REASON) == set(REASON_NAMES)


def test_the_operations_doc_table_is_generated_from_the_list() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    begin, end = "<!-- reasons:begin -->\n", "<!-- reasons:end -->"
    published = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert published == reasons_table(), (
        "docs/operations.md is out of date: regenerate the table between the reasons markers "
        "with `python -m service.webhooks.reasons`"
    )


def test_the_table_has_one_row_per_reason() -> None:
    rows = reasons_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == list(REASON_NAMES)
