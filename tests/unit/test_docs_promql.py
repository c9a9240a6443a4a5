"""The PromQL in the docs parses and names only metrics the code exports.

Every expression is a ```promql fenced block of README.md or docs/*.md (one expression per
block). Each one is checked three ways: the metric names it reads are among those defined with
prometheus_client in service/ and workers/ (under the names the exposition gives them: a
counter's ``_total``, a histogram's ``_bucket``/``_sum``/``_count``); the values it matches for
``reason`` and ``state`` are ones the code counts; and ``promtool check rules`` parses it
(promtool is Debian's package ``prometheus``; CI installs it, a laptop without it skips only
that check).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from service.domain import SignatureState
from service.webhooks.reasons import REASON_NAMES

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = (ROOT / "service", ROOT / "workers")
METRIC_TYPES = ("Counter", "Gauge", "Histogram", "Summary")

_BLOCK = re.compile(r"^```promql\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_LABEL_VALUES = re.compile(r'\b(reason|state)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def promql_blocks() -> list[tuple[str, str]]:
    """(where, expression) for every ```promql block of the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1).strip()))
    return found


@functools.cache
def defined_metrics() -> dict[str, str]:
    """Every prometheus_client metric of the code: its name (a counter's with ``_total``, as the
    docs write it) -> its type."""
    metrics: dict[str, str] = {}
    for directory in CODE_DIRS:
        for path in directory.rglob("*.py"):
            metrics |= _metrics_in(ast.parse(path.read_text(), str(path)))
    return metrics


def exported_metric_names() -> set[str]:
    """Every series name the code's metrics expose."""
    names: set[str] = set()
    for name, kind in defined_metrics().items():
        if kind == "Counter":
            names |= {name, f"{name.removesuffix('_total')}_created"}
        elif kind == "Gauge":
            names.add(name)
        else:
            names |= {f"{name}_sum", f"{name}_count", f"{name}_created"}
            names.add(f"{name}_bucket" if kind == "Histogram" else name)
    return names


def _metrics_in(tree: ast.Module) -> dict[str, str]:
    # Local name -> metric type, through any alias (``Counter as MetricCounter``).
    kinds = {
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
        for alias in node.names
        if alias.name in METRIC_TYPES
    }
    metrics: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        kind = kinds.get(node.func.id)
        first = node.args[0]
        if kind is None or not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        name = first.value
        metrics[f"{name.removesuffix('_total')}_total" if kind == "Counter" else name] = kind
    return metrics


def metric_names_in(expression: str) -> set[str]:
    """The series names an expression reads: identifiers that are not functions, keywords,
    label names, label values, durations or numbers."""
    text = _STRING.sub('""', expression)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        before = text[match.start() - 1] if match.start() else " "
        after = text[match.end() :].lstrip()[:1]
        if after == "(" or word.lower() in _KEYWORDS or before.isdigit() or before == ".":
            continue
        names.add(word)
    return names


BLOCKS = promql_blocks()


def test_the_docs_have_promql_blocks() -> None:
    # The alerts of docs/operations.md at least; a block renamed away would skip every check.
    assert len(BLOCKS) >= 10, BLOCKS


def test_the_metric_inventory_is_read_from_the_code() -> None:
    exported = exported_metric_names()
    # One of each kind, and the aliased import of service/ledger/unmapped.py.
    assert {
        "pandasync_webhook_rejected_total",
        "pandasync_sweep_drift",
        "pandasync_webhook_store_seconds_bucket",
        "pandasync_unmapped_values_total",
    } <= exported
    assert "pandasync_webhook_rejected" not in exported
    assert "pandasync_webhook_store_seconds" not in exported


def documented_metrics() -> set[str]:
    """The metric names of the first column of docs/operations.md's table of metrics."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("\n## Metrics\n") :]
    section = section[: section.index("\n## ", 1)]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split(" | ")[0]
            names |= set(re.findall(r"`(pandasync_[a-z0-9_]+)", first_cell))
    return names


def test_the_metrics_table_lists_exactly_the_metrics_the_code_defines() -> None:
    documented = documented_metrics()
    defined = {name for name in defined_metrics() if name.startswith("pandasync_")}
    assert not documented - defined, f"in the table, not in the code: {documented - defined}"
    assert not defined - documented, (
        f"defined in the code, missing from docs/operations.md#metrics: {defined - documented}"
    )


def test_metric_names_are_found_in_expressions() -> None:
    expression = (
        'sum by (le) (rate(a_total{reason=~"x|y"}[5m])) / on () b > 0.2 and c offset 1h '
        "or histogram_quantile(0.99, d_bucket) unless e[1h:5m]"
    )
    assert metric_names_in(expression) == {"a_total", "b", "c", "d_bucket", "e"}


@pytest.mark.parametrize(("where", "expression"), BLOCKS, ids=[w for w, _ in BLOCKS])
def test_each_expression_reads_only_exported_metrics(where: str, expression: str) -> None:
    names = metric_names_in(expression)
    assert names, f"{where}: no metric in {expression!r}"
    unknown = names - exported_metric_names()
    assert not unknown, f"{where}: {sorted(unknown)} are not metrics the code exports"


@pytest.mark.parametrize(("where", "expression"), BLOCKS, ids=[w for w, _ in BLOCKS])
def test_each_expression_matches_only_label_values_the_code_counts(
    where: str, expression: str
) -> None:
    known = {"reason": set(REASON_NAMES), "state": {s.value for s in SignatureState}}
    for label, _, value in _LABEL_VALUES.findall(expression):
        unknown = set(value.split("|")) - known[label]
        assert not unknown, f"{where}: {label} {sorted(unknown)} is never counted"


@pytest.mark.parametrize(("where", "expression"), BLOCKS, ids=[w for w, _ in BLOCKS])
def test_each_expression_is_balanced(where: str, expression: str) -> None:
    # Without promtool this is the check that runs: brackets nest and close, quotes close.
    text = _STRING.sub('""', expression)
    assert '"' not in text.replace('""', ""), f"{where}: an unclosed quote"
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in text:
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            opened = stack.pop() if stack else None
            assert opened == pairs[char], f"{where}: unbalanced {char!r}"
    assert not stack, f"{where}: unclosed {stack}"


def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run must install it")
        pytest.skip(message)
    rules = tmp_path / "docs_rules.yml"
    lines = ["groups:", "  - name: docs", "    rules:"]
    for index, (where, expression) in enumerate(BLOCKS):
        lines += [
            f"      - alert: docs_{index}",
            f"        expr: {json.dumps(' '.join(expression.split()))}",
            f"        annotations: {{where: {json.dumps(where)}}}",
        ]
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(BLOCKS)} rules found" in result.stdout, result.stdout


def test_promtool_refuses_a_broken_expression(tmp_path: Path) -> None:
    """The promtool check can fail: a histogram quantile without its parameter does not parse."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed; test_promtool_parses_every_expression says so")
    rules = tmp_path / "broken.yml"
    rules.write_text(
        "groups:\n  - name: broken\n    rules:\n      - alert: broken\n"
        '        expr: "sum(rate(pandasync_webhook_rejected_total[5m]) > 0"\n'
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
