"""Outbound webhooks benchmark: delivery throughput, and freshness with a slow endpoint.

    .venv/bin/python -m bench.outbound                 # 2,000 changes, then freshness x 2
    .venv/bin/python -m bench.outbound --skip-freshness

Throughput: ``--changes`` rows are put in ``ledger_changes`` of a scratch database (spread over
``--orders`` orders, so the per-order ordering rule is exercised), one endpoint is added with
``pandasync endpoints add``, then ``pandasync deliver`` (a subprocess, default settings but for
a 0.1 s poll) sends them to a local receiver (uvicorn, in this process) that verifies every
signature with ``standardwebhooks`` and answers 200. Reported: events per second from the
deliver role's start to the last delivery, and the receiver's count (each change once).

Isolation: ``bench.freshness`` twice, back to back, with the same arguments: without an
endpoint, and with ``--outbound-delay 2`` (``pandasync deliver`` running, its endpoint
answering every event after 2 s). Its p99 should not move.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from bench._stack import create_database, drop_database, server_url
from service.db import asyncpg_dsn
from tests.support.outbound_receiver import Receiver, running_receiver
from tests.support.stack import PANDASYNC, Stack, run_command


def _secret(output: str) -> str:
    found = re.search(r"whsec_\S+", output)
    if found is None:
        raise SystemExit(f"no secret in the output of `endpoints add`: {output!r}")
    return found.group(0)


@contextlib.contextmanager
def slow_endpoint(stack: Stack, delay_s: float) -> Iterator[Receiver]:
    """A receiver answering after ``delay_s``, an endpoint for it, and ``pandasync deliver``
    running on ``stack`` (for ``bench.freshness --outbound-delay``)."""
    with running_receiver() as receiver:
        receiver.delay_s = delay_s
        added = asyncio.run(run_command(stack, "endpoints", "add", receiver.url))
        receiver.secret = _secret(added.stdout)
        stack.add("deliver", [PANDASYNC, "deliver"]).start()
        try:
            yield receiver
        finally:
            print(
                f"outbound: {len(receiver.accepted())} events delivered to the endpoint "
                f"answering in {delay_s:g} s, {receiver.in_flight} in flight at the end, "
                f"{len(receiver.refused)} refused signatures"
            )


FILL = """
INSERT INTO ledger_changes (account_id, platform, order_id, kind, payload, occurred_at)
SELECT 'bench', 'taobao', 'o' || (n % $2), 'order.status_changed',
       jsonb_build_object('account_id', 'bench', 'platform', 'taobao',
                          'order_id', 'o' || (n % $2), 'from_status', 'paid',
                          'to_status', 'shipped'),
       now()
FROM generate_series(1, $1) AS n
"""


async def _fill(database_url: str, changes: int, orders: int) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(FILL, changes, orders)
    finally:
        await conn.close()


def throughput(args: argparse.Namespace) -> str:
    server = server_url(args.database_url)
    name, database_url = create_database(server, "pandasync_bench_outbound")
    workdir = Path(tempfile.mkdtemp(prefix="pandasync-bench-outbound-"))
    stack = Stack(
        database_url,
        "redis://127.0.0.1:6379/15",  # not used: no worker runs
        workdir,
        settings={"PANDASYNC_OUTBOUND_POLL_INTERVAL_S": "0.1", "PANDASYNC_LOG_LEVEL": "WARNING"},
    )
    try:
        with running_receiver() as receiver:
            added = asyncio.run(run_command(stack, "endpoints", "add", receiver.url))
            receiver.secret = _secret(added.stdout)
            asyncio.run(_fill(database_url, args.changes, args.orders))
            role = stack.add("deliver", [PANDASYNC, "deliver"])
            began = time.perf_counter()
            role.start()
            deadline = began + args.timeout
            while len(receiver.accepted()) < args.changes and time.perf_counter() < deadline:
                time.sleep(0.05)
            done = receiver.accepted()
            last = max((d.at for d in done), default=time.monotonic())
            elapsed = time.perf_counter() - began - (time.monotonic() - last)
            role.stop()
            unique = len({d.msg_id for d in done})
            return (
                f"outbound throughput: {len(done)} of {args.changes} changes ({args.orders} "
                f"orders) delivered in {elapsed:.2f} s from the start of `pandasync deliver`: "
                f"{len(done) / elapsed:.0f} events/s (OUTBOUND_CONCURRENCY 8); {unique} "
                f"distinct webhook-ids, {len(receiver.refused)} refused signatures"
            )
    finally:
        stack.stop()
        drop_database(server, name)


def freshness(args: argparse.Namespace) -> None:
    common = [
        sys.executable, "-m", "bench.freshness",
        "--rate", str(args.rate), "--duration", str(args.duration),
    ]  # fmt: skip
    if args.database_url:
        common += ["--database-url", args.database_url]
    for extra in ([], ["--outbound-delay", "2"]):
        print(f"\n$ {' '.join(['python -m bench.freshness', *common[3:], *extra])}", flush=True)
        subprocess.run([*common, *extra], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbound", description=__doc__)
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=90.0, help="give up after, s")
    parser.add_argument("--rate", type=int, default=25, help="freshness: messages per second")
    parser.add_argument("--duration", type=int, default=20, help="freshness: seconds of sending")
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument("--database-url", help="postgresql+asyncpg://… server for a scratch db")
    args = parser.parse_args(argv)
    print(throughput(args), flush=True)
    if not args.skip_freshness:
        freshness(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
