"""The shell commands of README.md and docs/*.md run as written.

Where the docs give commands: a ```sh or ```bash block holds one command a line (a trailing
``\\`` continues it, ``#`` starts a comment); in a ```console block the commands are the lines
that start with ``$ ``, and the rest is their output. A command that cannot run here (it serves
until stopped, takes minutes, needs PandaPon's real credentials, Docker, or installs something)
says so: its comment contains ``not run by the docs test``, or an HTML comment
``<!-- not run by the docs test: why -->`` on the line right before the block covers the whole
block.

Every other command runs, in a shell, against a migrated scratch database, a Redis database of
its own and a PandaPon sandbox holding a few orders, with the dev credentials and nothing from
the environment's ``PANDASYNC_*``, and must exit 0 without a traceback. A command that is not
run is still checked as far as can be without running it: ``pandasync SUB`` and
``python -m MODULE`` must accept ``--help`` and list every ``--option`` the docs give it, and
``make TARGET`` must be a target of the Makefile.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.domain import Platform
from service.sandbox.remote import SandboxRemote
from tests.support.servers import SandboxServer
from tests.support.stack import PANDASYNC

pytest_plugins = ["tests.support.sandbox"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "not run by the docs test"
SHELL_LANGUAGES = {"sh", "bash", "shell"}
COMMAND_TIMEOUT_S = 60

_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    where: str  # path:line
    text: str  # the command, continuation lines joined
    skip: str | None  # why it is not run, or None

    def tokens(self) -> list[str]:
        """The words of the command, without leading VAR=value assignments."""
        words = shlex.split(self.text)
        while words and _ASSIGNMENT.match(words[0]):
            words.pop(0)
        return words


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of one shell line: a ``#`` after a blank, outside quotes."""
    quote: str | None = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index + 1 :].strip()
    return line.rstrip(), ""


def commands_in(path: Path, root: Path = ROOT) -> list[Command]:
    lines = path.read_text().splitlines()
    found: list[Command] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        language = fence.group(2).lower()
        before = lines[index - 1].strip() if index else ""
        block_skip = (
            before[4:-3].strip() if before.startswith("<!--") and NOT_RUN in before else None
        )
        end = index + 1
        while end < len(lines) and not lines[end].startswith(fence.group(1)):
            end += 1
        if language in SHELL_LANGUAGES | {"console"}:
            where = path.relative_to(root).as_posix()
            found += _block_commands(where, index + 1, lines[index + 1 : end], language, block_skip)
        index = end + 1
    return found


def _block_commands(
    name: str, first: int, body: list[str], language: str, block_skip: str | None
) -> list[Command]:
    found: list[Command] = []
    pending: list[str] = []
    comments: list[str] = []
    start = 0
    for offset, raw in enumerate(body):
        line = raw.rstrip()
        if not pending:
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = first + offset + 1
        command, comment = split_comment(line)
        comments.append(comment)
        if command.endswith("\\"):
            pending.append(command[:-1].rstrip())
            continue
        pending.append(command.strip())
        text = " ".join(part.strip() for part in pending)
        said = next((c for c in comments if NOT_RUN in c), None)
        where = f"{name}:{start}"
        found.append(Command(where, text, block_skip or said))
        pending, comments = [], []
    assert not pending, f"{name}: a command ends in a continuation"
    return found


ALL = [command for doc in DOCS for command in commands_in(doc)]
RUN = [command for command in ALL if command.skip is None]
NOT_RUN_COMMANDS = [command for command in ALL if command.skip is not None]


def test_the_docs_give_commands_to_run_and_say_why_the_others_are_not() -> None:
    runnable = {command.text for command in RUN}
    # The ones an operator meets first; a block that lost its language would drop them.
    assert {
        "pandasync migrate",
        "pandasync status",
        "pandasync doctor",
        ".venv/bin/python -m service.config",
    } <= runnable, runnable
    # And the ones that cannot run here are there, marked: make run, the benchmarks, the soak.
    not_run = {command.text for command in NOT_RUN_COMMANDS}
    assert {"make run", "make soak", "pandasync doctor --listen 300"} <= not_run, not_run


def test_the_block_reader_finds_commands_comments_and_markers(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "```sh\n"
        "a --x 1   # explains\n"
        "b \\\n  --y 'q # not a comment'   # not run by the docs test: slow\n"
        "```\n"
        "<!-- not run by the docs test: a server -->\n"
        "```bash\nc\n```\n"
        "```console\n$ d --z\noutput # here\n```\n"
        "```\nnot a command\n```\n"
    )
    found = commands_in(doc, root=tmp_path)
    assert [(c.where, c.text, c.skip) for c in found] == [
        ("x.md:2", "a --x 1", None),
        ("x.md:3", "b --y 'q # not a comment'", "not run by the docs test: slow"),
        ("x.md:8", "c", "not run by the docs test: a server"),
        ("x.md:11", "d --z", None),
    ]


async def _populate(remote: SandboxRemote) -> None:
    """On each platform an order paid and shipped, and one awaiting payment: what
    ``pandasync doctor`` needs to check every endpoint and shape."""
    for platform in (Platform.TAOBAO, Platform.ALIBABA_1688):
        order = await remote.create_order(
            platform, [{"title": "袜子", "quantity": 2, "unit_price": "5"}], shipping_fee="1"
        )
        await remote.pay(platform, order["order_id"])
        await remote.ship(
            platform, order["order_id"], events=[{"description": "快件已揽收", "status": "ACCEPT"}]
        )
        await remote.create_order(platform)
    # The sandbox stamps changes up to a few seconds ahead; the order lists end "now".
    latest = max(datetime.fromisoformat(o["modified_at"]) for o in await remote.orders())
    await asyncio.sleep(max(0.0, (latest - datetime.now(UTC)).total_seconds()) + 1.0)


def _environment(
    tmp_path: Path, database_url: str, redis_url: str, sandbox: SandboxServer
) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    venv_bin = str(Path(sys.executable).parent)
    return {
        **clean,
        "PATH": f"{venv_bin}{os.pathsep}{clean.get('PATH', '')}",
        "PANDASYNC_DATABASE_URL": database_url,
        "PANDASYNC_BROKER_URL": redis_url,
        "PANDASYNC_API_BASE_URL": sandbox.url,
        "PANDASYNC_ACCESS_KEY": sandbox.settings.access_key,
        "PANDASYNC_ACCESS_SECRET": sandbox.settings.access_secret.get_secret_value(),
        "PANDASYNC_USER_ID": sandbox.settings.user_id,
        "PANDASYNC_UPSTREAM_RATE_LIMIT_RPS": "1000",
        "PANDASYNC_DATA_DIR": str(tmp_path / "data"),
    }


async def test_every_command_the_docs_run_exits_0(
    tmp_path: Path,
    fresh_database_url: str,
    own_redis: str,
    sandbox_server: SandboxServer,
) -> None:
    await _populate(sandbox_server.remote)
    env = _environment(tmp_path, fresh_database_url, own_redis, sandbox_server)
    # Relative paths of the docs (.venv/bin/python) are the checkout's; the working directory
    # is a scratch one that links to the environment, so no .env of the checkout is read.
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(Path(sys.executable).parent.parent)
    failures: list[str] = []
    for command in RUN:
        try:
            result = await asyncio.to_thread(
                subprocess.run,
                ["bash", "-c", command.text],
                env=env,
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            failures.append(
                f"{command.where}: `{command.text}` still running after {COMMAND_TIMEOUT_S} s"
            )
            continue
        if result.returncode != 0 or "Traceback" in result.stderr:
            output = (result.stdout + result.stderr)[-2000:]
            failures.append(
                f"{command.where}: `{command.text}` exited {result.returncode}:\n{output}"
            )
    assert not failures, "\n\n".join(failures)


def _help_of(words: list[str]) -> subprocess.CompletedProcess[str] | None:
    program = Path(words[0]).name
    if program == "pandasync" and len(words) > 1:
        argv = [PANDASYNC, words[1], "--help"]
    elif program.startswith("python") and len(words) > 2 and words[1] == "-m":
        argv = [sys.executable, "-m", words[2], "--help"]
    else:
        return None
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


_PYTEST_OPTIONS_WITH_VALUES = {"-k", "-m", "-p", "--deselect", "--durations"}


@pytest.mark.parametrize("command", NOT_RUN_COMMANDS, ids=[c.where for c in NOT_RUN_COMMANDS])
def test_a_command_not_run_still_exists_with_its_options(command: Command) -> None:
    words = command.tokens()
    program = Path(words[0]).name
    if program == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in (w for w in words[1:] if not _ASSIGNMENT.match(w)):
            assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), (
                f"{command.where}: no make target {target!r}"
            )
        return
    if program == "pytest":
        # What follows an option that takes a value (`-k rabbitmq`, `-m soak`) is no path.
        values = {i + 1 for i, w in enumerate(words) if w in _PYTEST_OPTIONS_WITH_VALUES}
        for i, path in enumerate(words[1:], 1):
            if not path.startswith("-") and i not in values:
                assert (ROOT / path).exists(), f"{command.where}: {path} does not exist"
        return
    result = _help_of(words)
    if result is None:  # uv, docker …: nothing of ours to check
        assert program in {"uv", "docker", "openssl"}, f"{command.where}: what checks {program}?"
        return
    assert result.returncode == 0, f"{command.where}: {result.stdout}{result.stderr}"
    for option in (w.split("=", 1)[0] for w in words if w.startswith("--")):
        listed = re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout)
        assert listed, f"{command.where}: {option} is not an option of {words[:3]}"
