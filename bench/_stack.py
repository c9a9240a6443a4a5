"""Shared by the freshness and backfill benchmarks: a scratch database, a flushed Redis db,
and the real processes (``tests.support.stack.Stack``) with workers sized for a benchmark."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import psutil

from service.db import asyncpg_dsn, with_database
from tests.support.stack import PANDASYNC, Stack

DEFAULT_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
# A benchmark shares its machine with whatever else runs there: a loaded machine can take far
# longer than the tests' start timeout to start the processes, which is no result to report.
BENCH_START_TIMEOUT_S = 180.0


async def admin(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def server_url(given: str | None) -> str:
    return given or os.environ.get("PANDASYNC_TEST_DATABASE_URL") or DEFAULT_SERVER


def create_database(server: str, prefix: str) -> tuple[str, str]:
    """A fresh migrated database: (name, url)."""
    from service.ledger.migrations import run_migrations

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(server, f'CREATE DATABASE "{name}"'))
    url = with_database(server, name)
    run_migrations(url)
    return name, url


def drop_database(server: str, name: str) -> None:
    asyncio.run(admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class BenchStack(Stack):
    """``Stack`` with ``worker_processes`` x ``worker_threads`` reconcile workers."""

    def __init__(
        self,
        database_url: str,
        redis_url: str,
        workdir: Path,
        *,
        settings: dict[str, str],
        worker_processes: int,
        worker_threads: int,
    ) -> None:
        super().__init__(database_url, redis_url, workdir, settings=settings)
        self.worker_processes = worker_processes
        self.worker_threads = worker_threads

    async def start(self, *, scheduler: bool = False, workers: int = 1) -> None:
        self.web_ports = [self.web_port]  # read by wait_ready in newer versions of Stack
        sandbox_env = {"PANDASYNC_SANDBOX_DELIVERY__WEBHOOK_URL": self.webhook_url}
        port = str(self.sandbox_port)
        self.add("sandbox", [PANDASYNC, "sandbox", "--port", port], **sandbox_env).start()
        self.add("web", [PANDASYNC, "serve", "--port", str(self.web_port)]).start()
        argv = [PANDASYNC, "worker", "--processes", str(self.worker_processes)]
        self.add("worker", [*argv, "--threads", str(self.worker_threads)]).start()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """``Stack.wait_ready``, tried again until ``BENCH_START_TIMEOUT_S`` while every
        process still runs."""
        deadline = time.monotonic() + BENCH_START_TIMEOUT_S
        while True:
            try:
                await super().wait_ready()
                return
            except AssertionError:
                self._check_alive()  # a process that exited is a failure at once
                if time.monotonic() > deadline:
                    raise


@contextmanager
def running_stack(
    args: argparse.Namespace, kind: str, settings: Mapping[str, str]
) -> Iterator[tuple[BenchStack, Path]]:
    """A started ``BenchStack`` on a scratch database and a flushed Redis db, sized by the
    bench's ``--worker-processes``/``--worker-threads``, and its work directory; everything
    is dropped afterwards (the directory kept with ``--keep``)."""
    server = server_url(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix=f"pandasync-bench-{kind}-"))
    flush_redis(args.redis_url)
    name, database_url = create_database(server, f"pandasync_bench_{kind}")
    stack = BenchStack(
        database_url,
        args.redis_url,
        workdir,
        settings={**settings, "PANDASYNC_LOG_LEVEL": "WARNING"},
        worker_processes=args.worker_processes,
        worker_threads=args.worker_threads,
    )
    try:
        asyncio.run(stack.start())
        yield stack, workdir
    finally:
        stack.stop()
        drop_database(server, name)
        flush_redis(args.redis_url)
        if args.keep:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


class CpuMeter:
    """CPU seconds (user + system) spent by each role's process tree between ``start`` and
    ``stop``: where a benchmark's machine time goes, per message. ``postgres`` is every server
    process, ``bench`` this process (the load generator)."""

    def __init__(self, roots: Mapping[str, int]) -> None:
        self.roots = dict(roots)
        self._before: dict[int, tuple[str, float]] = {}

    def _sample(self) -> dict[int, tuple[str, float]]:
        sample: dict[int, tuple[str, float]] = {}
        procs: list[tuple[str, psutil.Process]] = []
        for role, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs += [(role, p) for p in [root, *root.children(recursive=True)]]
            except psutil.NoSuchProcess:
                continue
        procs.append(("bench", psutil.Process()))  # after the roles: they are its children
        procs += _postgres_processes()
        for role, proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            sample.setdefault(proc.pid, (role, times.user + times.system))
        return sample

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for pid, (role, seconds) in self._sample().items():
            started = self._before.get(pid, (role, 0.0))[1]
            spent[role] = spent.get(role, 0.0) + max(0.0, seconds - started)
        return spent


def _postgres_processes() -> list[tuple[str, psutil.Process]]:
    found = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("postgres", "postmaster"):
            found.append(("postgres", proc))
    return found


def cpu_lines(spent: Mapping[str, float], messages: int) -> list[str]:
    """``role: N ms of CPU per message`` lines, largest first, and the total."""
    lines = [
        f"  {role:<10} {seconds * 1000 / messages:7.2f} ms/message  ({seconds:.1f} s)"
        for role, seconds in sorted(spent.items(), key=lambda kv: -kv[1])
    ]
    total = sum(spent.values())
    lines.append(f"  {'all':<10} {total * 1000 / messages:7.2f} ms/message  ({total:.1f} s)")
    return lines
