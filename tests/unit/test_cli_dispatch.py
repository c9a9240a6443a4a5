"""``pandasync`` imports a command's module only when that command runs (common.COMMAND_MODULES):
the table names every command where it is defined, and a command that needs no database starts
without the ledger's models."""

from __future__ import annotations

import importlib
import subprocess
import sys

import click

from service.cli import main
from service.cli.common import COMMAND_MODULES


def test_the_table_names_each_command_where_it_is_defined() -> None:
    for module in set(COMMAND_MODULES.values()):
        importlib.import_module(module)
    defined = {
        name: command.callback.__module__
        for name, command in main.commands.items()
        if command.callback is not None
    }
    assert defined == COMMAND_MODULES
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMAND_MODULES)


def test_the_worker_launcher_starts_without_the_ledger_models() -> None:
    probe = (
        "import sys, click; from service.cli import main; "
        "main.get_command(click.Context(main), 'worker'); "
        "print(sorted(m for m in ('sqlalchemy', 'service.ledger.models') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
