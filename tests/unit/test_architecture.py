"""The imports run one way (docs/architecture.md): the domain vocabulary under everything, the
PandaPon client and the ledger above it, the web role and the workers above those, and the
operator's commands on top. Read from the code itself, so a new import that breaks a rule
fails here, naming the file and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# room -> the rooms it must never import (module-name prefixes).
UPWARD = (
    "service.webhooks",
    "service.app",
    "service.console",
    "workers",
    "service.cli",
    "service.devserver",
)
RULES: dict[str, tuple[str, ...]] = {
    "service.domain": ("service", "workers"),
    "service.pandapon": (*UPWARD, "service.ledger", "service.broker", "service.sandbox"),
    "service.ledger": (*UPWARD, "service.broker", "service.sandbox", "service.doctor"),
    "service.broker": (*UPWARD, "service.ledger", "service.pandapon", "service.sandbox"),
    "service.sandbox": (*UPWARD, "service.ledger", "service.broker", "service.doctor"),
    "service.webhooks": (
        "workers",
        "service.cli",
        "service.devserver",
        "service.sandbox",
        "service.console",
    ),
    # The console is part of the web role: it reads the ledger and sends through the broker,
    # and loads no worker code (nor the webhook receiver's).
    "service.console": (
        "workers",
        "service.cli",
        "service.devserver",
        "service.sandbox",
        "service.webhooks",
        "service.app",
    ),
    "service.app": ("workers", "service.cli", "service.devserver", "service.sandbox"),
    "workers": (
        "service.webhooks",
        "service.app",
        "service.console",
        "service.sandbox",
        "service.cli",
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, load_time_only: bool = False) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in the file (a function-level import counts);
    ``load_time_only``: only those at the module's top level, outside ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if load_time_only else ast.walk(tree)
    found: list[tuple[int, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


SOURCES = sorted([*ROOT.joinpath("service").rglob("*.py"), *ROOT.joinpath("workers").rglob("*.py")])


@pytest.mark.parametrize("room", sorted(RULES))
def test_no_room_imports_a_room_above_it(room: str) -> None:
    broken = []
    for path in SOURCES:
        name = module_name(path)
        if not within(name, room):
            continue
        for line, imported in imports(path):
            forbidden = [
                p for p in RULES[room] if within(imported, p) and not within(imported, room)
            ]
            if forbidden:
                broken.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert broken == [], "\n".join(broken)


def test_the_rules_see_every_room() -> None:
    """A typo in RULES would make its test pass vacuously."""
    names = {module_name(p) for p in SOURCES}
    for room in RULES:
        assert any(within(n, room) for n in names), room


def test_no_import_cycle() -> None:
    modules = {module_name(p): p for p in SOURCES}

    def project_modules(path: Path) -> set[str]:
        """``a.b.c`` names module ``a.b.c`` when there is one, else its package ``a.b``."""
        found = set()
        for _, name in imports(path, load_time_only=True):
            found.add(name if name in modules else name.rpartition(".")[0])
        return found & set(modules)

    graph = {name: project_modules(p) - {name} for name, p in modules.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append([*path[path.index(name) :], name])
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)
