"""Published reference docs that are generated from the code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from service.config import settings_reference

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_doc_lists_every_setting_as_the_code_defines_it() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
    published = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert published == settings_reference(), (
        "docs/configuration.md is out of date: regenerate the table with `python -m service.config`"
    )
