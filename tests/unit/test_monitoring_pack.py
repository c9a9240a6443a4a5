"""The monitoring pack of deploy/ holds: the alert rules, the scrape configuration and the
Grafana dashboard parse, name only metrics the code exports, cover what the code exports, and
say what docs/operations.md says.

promtool (Debian's package ``prometheus``) checks the rules and the configuration and runs the
rules' unit tests (deploy/prometheus/pandasync-rules.test.yml); CI installs it, and there a
missing promtool fails these tests instead of skipping them.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq.middleware.prometheus
import pytest
import yaml

from service.config import Settings
from service.domain import Platform, SignatureState
from service.webhooks.reasons import REASON_NAMES
from tests.unit.test_docs_links import anchors
from tests.unit.test_docs_promql import METRIC_TYPES, defined_metrics, metric_names_in

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "pandasync-rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "pandasync-rules.test.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "pandasync.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# Metric families the dashboard leaves out on purpose, as "family": "why". A family here must
# still be one the code exports, and must not be on the dashboard after all. None today: every
# family has a panel.
EXCLUDED: dict[str, str] = {}

# The refusal reasons no alert pages for: nothing to fix (docs/operations.md#refused-callbacks).
HARMLESS_REASONS = {"bad_nonce", "replayed_nonce"}
# The alerts the rules' unit tests must show both firing and staying quiet.
TESTED_ALERTS = {
    "PandasyncCallbacksRefusedAuth",
    "PandasyncInboxBacklogGrowing",
    "PandasyncCallbackLag",
    "PandasyncNoSweep",
}
# Grafana's variables, as the dashboard's queries use them, and a value promtool can parse.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}

_DURATION = re.compile(r"^\d+[smhdwy]$")
_RUNBOOK = re.compile(r"^docs/operations\.md#([a-z0-9_-]+)$")
_LABEL_VALUES = re.compile(r'\b(reason|state|result|job)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_PROMQL_BLOCK = re.compile(r"^```promql\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_ALERT_LEAD = re.compile(r"\(`(Pandasync\w+)`(?:, `for: (\w+)`)?\):")


# --- promtool ----------------------------------------------------------------------------


def promtool() -> str:
    """promtool's path; without it the test skips, except in CI where it fails."""
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run must install it")
        pytest.skip(message)
    return found


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# --- what the files hold -------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def normalized(expression: str) -> str:
    return " ".join(expression.split())


# --- what the code exports ---------------------------------------------------------------


@functools.cache
def dramatiq_metrics() -> dict[str, str]:
    """The metrics of dramatiq's Prometheus middleware, which the worker role exposes:
    ``prom.Counter("dramatiq_…", …)`` calls, read from its source."""
    source = Path(dramatiq.middleware.prometheus.__file__).read_text()
    metrics: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        first = node.args[0] if node.args else None
        if node.func.attr in METRIC_TYPES and isinstance(first, ast.Constant):
            metrics[str(first.value)] = node.func.attr
    return metrics


@functools.cache
def families() -> dict[str, str]:
    """Every metric family the roles expose (a counter's with ``_total``) -> its type."""
    return {**defined_metrics(), **dramatiq_metrics()}


def series_names(family: str, kind: str) -> set[str]:
    """The series names a family is exposed under."""
    if kind in {"Counter", "Gauge"}:
        return {family}
    suffixes = ("_bucket", "_sum", "_count") if kind == "Histogram" else ("", "_sum", "_count")
    return {family + suffix for suffix in suffixes}


@functools.cache
def exported() -> dict[str, str]:
    """Every series name the roles expose -> its family."""
    return {
        name: family for family, kind in families().items() for name in series_names(family, kind)
    }


def scheduled_job_names() -> set[str]:
    """The ``job`` label values of the scheduler's metrics (workers/scheduler.py): a sweep's is
    ``name:platform``."""
    names = {"refresh", "relay"}
    for platform in Platform:
        names |= {f"sweep:{platform.value}", f"refund_sweep:{platform.value}"}
    return names


def handoff_results() -> set[str]:
    """The ``result`` label values of pandasync_webhook_handoff_total."""
    source = (ROOT / "service" / "webhooks" / "metrics.py").read_text()
    return set(re.findall(r'HANDOFF\.labels\(result="(\w+)"\)', source))


KNOWN_LABEL_VALUES = {
    "reason": set(REASON_NAMES),
    "state": {state.value for state in SignatureState},
    "result": handoff_results(),
}


def label_problems(expression: str) -> Iterator[str]:
    """Label matchers that can never match what the code counts."""
    for label, operator, value in _LABEL_VALUES.findall(expression):
        if label == "job":
            if not any(re.fullmatch(value, name) for name in scheduled_job_names()):
                yield f"job {value!r} matches no scheduled job"
            continue
        values = set(value.split("|")) if "~" in operator else {value}
        unknown = values - KNOWN_LABEL_VALUES[label]
        if unknown:
            yield f"{label} {sorted(unknown)} is never counted"


# --- the rules -----------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout, result.stdout


def test_the_rules_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(RULES_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_the_rules_unit_tests_can_fail(tmp_path: Path) -> None:
    """With rules that never fire, the unit tests that expect alerts fail."""
    silent = load_yaml(RULES)
    for group in silent["groups"]:
        for rule in group["rules"]:
            rule["expr"] = "vector(1) < 0"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(silent))
    shutil.copy(RULES_TESTS, tmp_path / RULES_TESTS.name)
    result = run_promtool("test", "rules", RULES_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    for alert in TESTED_ALERTS:
        assert f"alertname: {alert}," in result.stdout + result.stderr, alert


def test_the_unit_tests_show_each_required_alert_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(RULES_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing >= TESTED_ALERTS, f"never shown firing: {TESTED_ALERTS - firing}"
    assert quiet >= TESTED_ALERTS, f"never shown quiet on healthy input: {TESTED_ALERTS - quiet}"
    known = {rule["alert"] for rule in rules()}
    assert firing | quiet <= known, f"tests of no rule: {(firing | quiet) - known}"


def test_each_rule_has_a_name_severity_summary_and_runbook() -> None:
    names = [rule.get("alert") for rule in rules()]
    assert len(names) == len(set(names)), names
    operations_anchors = anchors(OPERATIONS)
    for rule in rules():
        name = rule.get("alert")
        assert isinstance(name, str), rule
        assert re.fullmatch(r"Pandasync[A-Z]\w+", name), name
        assert isinstance(rule.get("expr"), str), name
        assert rule["expr"].strip(), name
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        runbook = _RUNBOOK.match(annotations.get("runbook", ""))
        assert runbook, (
            f"{name}: runbook {annotations.get('runbook')!r} is not docs/operations.md#…"
        )
        assert runbook.group(1) in operations_anchors, f"{name}: no heading #{runbook.group(1)}"
        if "for" in rule:
            assert _DURATION.match(str(rule["for"])), f"{name}: for {rule['for']!r}"


@pytest.mark.parametrize("rule", rules(), ids=[rule["alert"] for rule in rules()])
def test_each_rule_reads_only_exported_metrics(rule: dict[str, Any]) -> None:
    names = metric_names_in(rule["expr"])
    assert names, f"{rule['alert']}: no metric in {rule['expr']!r}"
    unknown = names - set(exported())
    assert not unknown, f"{rule['alert']}: {sorted(unknown)} are not metrics the code exports"
    assert not list(label_problems(rule["expr"])), list(label_problems(rule["expr"]))


def test_every_refusal_reason_is_alerted_or_harmless() -> None:
    """A new reason must be put in one of the refused-callback alerts, or called harmless."""
    alerted: dict[str, str] = {}
    for rule in rules():
        if "pandasync_webhook_rejected_total" not in rule["expr"]:
            continue
        for label, _, value in _LABEL_VALUES.findall(rule["expr"]):
            if label == "reason":
                for reason in value.split("|"):
                    assert reason not in alerted, (
                        f"{reason} in {alerted[reason]} and {rule['alert']}"
                    )
                    alerted[reason] = rule["alert"]
    assert not HARMLESS_REASONS & set(alerted), HARMLESS_REASONS & set(alerted)
    missing = set(REASON_NAMES) - set(alerted) - HARMLESS_REASONS
    assert not missing, f"reasons no alert covers: {sorted(missing)}"


def test_label_checks_find_what_they_look_for() -> None:
    assert not list(label_problems('x{job=~"(refund_)?sweep:.+", reason="wrong_token"}'))
    assert not list(label_problems('x{result="sent", state!="valid"}'))
    assert list(label_problems('x{job=~"sweeps:.+"}'))
    assert list(label_problems('x{reason=~"wrong_token|no_such_reason"}'))
    assert list(label_problems('x{result="lost"}'))


# --- the scrape configuration ------------------------------------------------------------------


def test_promtool_checks_the_scrape_configuration() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout, result.stdout


def test_the_scrape_configuration_loads_the_rules_and_scrapes_the_four_roles() -> None:
    config = load_yaml(PROMETHEUS)
    # Relative to prometheus.yml, so that the two files can be copied together anywhere.
    assert config["rule_files"] == [RULES.name]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    defaults = Settings.model_fields
    ports = {
        "pandasync-web": 8000,
        "pandasync-worker": defaults["worker_metrics_port"].default,
        "pandasync-scheduler": defaults["scheduler_metrics_port"].default,
        "pandasync-deliver": 9193,  # `deliver --metrics-port` in docker-compose.yml
    }
    assert set(jobs) == set(ports)
    for name, port in ports.items():
        targets = [t for c in jobs[name].get("static_configs", []) for t in c["targets"]]
        # Services that run as replicas are found by name: every replica is its own target.
        discovered = [
            f"{n}:{c['port']}" for c in jobs[name].get("dns_sd_configs", []) for n in c["names"]
        ]
        assert targets or discovered, name
        assert all(t.endswith(f":{port}") for t in targets + discovered), (name, targets)
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    for name in ("pandasync-web", "pandasync-worker"):
        assert jobs[name]["dns_sd_configs"][0]["type"] == "A", name
    # The scheduler's own `job` label (the scheduled job) is what PandasyncNoSweep reads.
    assert jobs["pandasync-scheduler"].get("honor_labels") is True


# --- the dashboard -------------------------------------------------------------------------------


def test_the_dashboard_has_the_structure_grafana_needs() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int)
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"]
    assert board["title"]
    assert board.get("id") is None  # an import creates it
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}

    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), ids
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        title = panel.get("title")
        assert title, panel["id"]
        assert panel["type"] in {"row", "timeseries", "stat"}, title
        grid = panel["gridPos"]
        assert min(grid["w"], grid["h"]) > 0, title
        assert min(grid["x"], grid["y"]) >= 0, title
        assert grid["x"] + grid["w"] <= 24, f"{title}: wider than the grid"
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{title} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        targets = panel["targets"]
        assert targets, f"{title}: no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in targets:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title


@pytest.mark.parametrize(
    ("title", "expression"), dashboard_queries(), ids=[t for t, _ in dashboard_queries()]
)
def test_each_dashboard_query_reads_only_exported_metrics(title: str, expression: str) -> None:
    names = metric_names_in(expression)
    assert names, f"{title}: no metric in {expression!r}"
    unknown = names - set(exported())
    assert not unknown, f"{title}: {sorted(unknown)} are not metrics the roles export"
    assert 'instance=~"$instance"' in expression, f"{title}: the instance filter is missing"
    assert not list(label_problems(expression)), list(label_problems(expression))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, (title, expression) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, f"{title}: a variable promtool cannot read: {expression}"
        lines += [
            f"      - record: dashboard_{index}",
            f"        expr: {json.dumps(normalized(expression))}",
        ]
    checked = tmp_path / "dashboard_rules.yml"
    checked.write_text("\n".join(lines) + "\n")
    result = run_promtool("check", "rules", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(dashboard_queries())} rules found" in result.stdout, result.stdout


def test_every_exported_family_is_on_the_dashboard_or_excluded() -> None:
    shown = {
        exported()[n] for _, e in dashboard_queries() for n in metric_names_in(e) if n in exported()
    }
    not_exported = set(EXCLUDED) - set(families())
    assert not not_exported, f"excluded, but no role exports them: {sorted(not_exported)}"
    assert not set(EXCLUDED) & shown, f"excluded and shown: {sorted(set(EXCLUDED) & shown)}"
    missing = set(families()) - shown - set(EXCLUDED)
    assert not missing, f"exported, on no panel and not in EXCLUDED: {sorted(missing)}"


def test_the_metric_inventory_includes_dramatiqs() -> None:
    # The worker exposes dramatiq's middleware metrics (workers/main.py): they count as exported.
    assert "dramatiq.middleware.prometheus" in (ROOT / "workers" / "main.py").read_text()
    assert {"dramatiq_messages_total", "dramatiq_message_duration_milliseconds"} <= set(
        dramatiq_metrics()
    )
    assert "dramatiq_message_duration_milliseconds_bucket" in exported()
    assert "pandasync_sync_failures_open" in exported()


# --- the docs -------------------------------------------------------------------------------------


def section(title: str) -> str:
    text = OPERATIONS.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def documented_alerts() -> dict[str, tuple[str, str | None]]:
    """alert name -> (expression, for) of docs/operations.md#alerts-worth-setting: each promql
    block, named by the ``(`Name`, `for: 5m`):`` of the paragraph before it."""
    text = section("Alerts worth setting")
    found: dict[str, tuple[str, str | None]] = {}
    previous_end = 0
    for block in _PROMQL_BLOCK.finditer(text):
        leads = _ALERT_LEAD.findall(text[previous_end : block.start()])
        assert len(leads) == 1, f"the block {block.group(1)!r} is named by {leads}"
        name, duration = leads[0]
        assert name not in found, f"{name} twice"
        found[name] = (normalized(block.group(1)), duration or None)
        previous_end = block.end()
    return found


def test_the_alerts_section_and_the_rules_say_the_same() -> None:
    documented = documented_alerts()
    ruled = {r["alert"]: (normalized(r["expr"]), r.get("for")) for r in rules()}
    assert set(documented) == set(ruled), (
        f"only in the docs: {set(documented) - set(ruled)}; "
        f"only in the rules: {set(ruled) - set(documented)}"
    )
    for name, (expression, duration) in ruled.items():
        assert documented[name][0] == expression, f"{name}: the docs' expression differs"
        assert documented[name][1] == duration, f"{name}: for {documented[name][1]} != {duration}"


def test_the_monitoring_pack_section_says_how_to_load_it() -> None:
    text = section("Monitoring pack")
    for needed in (
        "deploy/grafana/pandasync.json",
        "deploy/prometheus/pandasync-rules.yml",
        "deploy/prometheus/prometheus.yml",
        "rule_files",
        "Import",
        "honor_labels: true",
    ):
        assert needed in text, needed
    # Each alert with its runbook, as the rules file has it.
    for rule in rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        row = next((line for line in text.splitlines() if f"| `{rule['alert']}` |" in line), None)
        assert row, f"{rule['alert']} is not in the Monitoring pack's table"
        assert f"| {rule['labels']['severity']} |" in row, rule["alert"]
        assert f"(#{anchor})" in row, f"{rule['alert']}: the table's runbook is not #{anchor}"
