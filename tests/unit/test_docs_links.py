"""The repository's references stay inside it and lead somewhere.

- No file names a document outside the repository: the upstream contract is docs/upstream.md,
  the product contract README.md and docs/. So no path to the folder beside the checkout, no
  name of the notes the project started from, no section number of theirs (``§4.1``, "design §3").
- Every relative Markdown link of README.md and docs/*.md leads to a file that exists and, with
  an ``#anchor``, to a heading of it (GitHub's slugs).
- Every ``docs/…md#anchor`` written anywhere (code comments, docstrings, tests) does too.
"""

from __future__ import annotations

import functools
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Spelled in pieces, so that this file does not name what it forbids.
_OUTSIDE = (
    "../" + "shared",
    "pandapon-api" + ".md",
    "design" + ".md",
)
# A section sign before a number cites a numbered document; the repository's own docs have no
# numbered sections. An RFC's section is the one exception.
_SECTION = re.compile(r"(?<!RFC \d{4} )(?<!RFC \d{3} )\u00a7\s*\d|design \u00a7")
MARKDOWN_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
_DOC_ANCHOR = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)#([A-Za-z0-9_-]+)")


def tracked_text_files() -> list[Path]:
    """Every file git tracks or would track (new files included), that is text."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = []
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        files.append(path)
    return files


def text_of(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char in "-_ " or category[0] in "LN" or category == "Mn":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    text = _FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for match in _HEADING.finditer(text):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link outside code."""
    text = path.read_text()
    # Blank out code, keeping the line count, so that line numbers stay right.
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = _INLINE_CODE.sub("``", text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(text)]


def broken(source: Path, target: str) -> str | None:
    """Why ``target``, linked from ``source``, leads nowhere; None when it leads somewhere."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …
        return None
    path_part, _, anchor = target.partition("#")
    destination = (source.parent / path_part).resolve() if path_part else source
    if not destination.exists():
        return f"{path_part} does not exist"
    if ROOT not in destination.parents and destination != ROOT:
        return f"{path_part} is outside the repository"
    if anchor:
        if destination.suffix != ".md":
            return f"#{anchor} on a file that is not Markdown"
        if anchor not in anchors(destination):
            return f"{destination.relative_to(ROOT)} has no heading #{anchor}"
    return None


def test_the_slugs_are_githubs() -> None:
    assert slug("Reading `pandasync status`") == "reading-pandasync-status"
    assert slug("When PandaPon limits or slows us") == "when-pandapon-limits-or-slows-us"
    assert slug("Requests: host and signing") == "requests-host-and-signing"
    assert slug("1688 payloads") == "1688-payloads"
    assert slug("`report_sync_health`") == "report_sync_health"
    assert slug("A [link](x.md) — and more") == "a-link--and-more"


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    doc = ROOT / "docs" / "operations.md"
    assert broken(doc, "configuration.md") is None
    assert broken(doc, "#first-deploy") is None
    assert broken(doc, "upstream.md#callbacks") is None
    assert broken(doc, "nowhere.md") == "nowhere.md does not exist"
    assert broken(doc, "#no-such-heading") is not None
    assert broken(doc, "upstream.md#no-such-heading") is not None
    assert broken(doc, "https://example.com/x#y") is None
    assert _SECTION.search("as " + "\u00a7" + "4.1 says")
    assert _SECTION.search("design " + "\u00a7" + "3")
    assert not _SECTION.search("RFC 8259 " + "\u00a7" + "8.1")
    sample = tmp_path / "sample.md"
    sample.write_text("# Top\n\n[a](#top) `[b](#nowhere)`\n\n```\n[c](#gone)\n```\n[d](#gone)\n")
    assert links(sample) == [(3, "#top"), (8, "#gone")]


def test_the_files_are_listed() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in tracked_text_files()}
    assert {"README.md", "docs/upstream.md", "service/config.py", ".ci/run"} <= names


@pytest.mark.parametrize("needle", _OUTSIDE)
def test_no_file_names_a_document_outside_the_repository(needle: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in tracked_text_files()
        for number, line in enumerate(text_of(path).splitlines(), 1)
        if needle in line
    ]
    assert not offenders, (
        f"{needle!r} names a file outside the repository; point to docs/upstream.md (or "
        f"another file in the repository) instead: {offenders}"
    )


def test_no_file_cites_a_numbered_section_of_an_outside_document() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}"
        for path in tracked_text_files()
        if path != Path(__file__).resolve()
        for number, line in enumerate(text_of(path).splitlines(), 1)
        if _SECTION.search(line)
    ]
    assert not offenders, (
        "a section number of a document outside the repository; link the section of "
        f"docs/upstream.md (or README.md, docs/…) instead: {offenders}"
    )


@pytest.mark.parametrize("doc", MARKDOWN_DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_somewhere(doc: Path) -> None:
    problems = [
        f"{doc.relative_to(ROOT)}:{line}: ({target}) {why}"
        for line, target in links(doc)
        if (why := broken(doc, target)) is not None
    ]
    assert not problems, problems


def test_docs_anchors_named_anywhere_exist() -> None:
    problems = []
    for path in tracked_text_files():
        for number, line in enumerate(text_of(path).splitlines(), 1):
            for name, anchor in _DOC_ANCHOR.findall(line):
                why = broken(ROOT / "docs" / "x.md", f"{name}#{anchor}")
                if why is not None:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: {why}")
    assert not problems, problems
