"""Remap benchmark: ``pandasync remap`` over a ledger filled as reconciles fill it.

    .venv/bin/python -m bench.remap              # small: 5,000 orders
    .venv/bin/python -m bench.remap --large      # 100,000 orders

A scratch database is filled with ``--orders`` sandbox orders (random scenarios, both
platforms, parcels and refunds), rendered as PandaPon answers, mapped by the client's mapping
and written by ``write_order``, as a reconcile would. Then what an older mapping would have left
is written by hand into a tenth of the orders (``status = 'unknown'``, no total), and the real
command runs twice as a subprocess:

- run 1 puts the truth back (history rows with source ``remap``);
- run 2 finds nothing to change (it must report 0 written again, 0 changed).

Baseline, same run, same database: the floor of any remap, reading every order's stored
payloads in the same batches and mapping them, without writing (``rederive`` only). Reported:
wall time, orders per second, the ratio to the floor, and the command's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime

from bench._stack import create_database, drop_database, server_url
from service.db import asyncpg_dsn
from tests.support.stack import PANDASYNC

CHUNK = 1000
SPOILED_SHARE = 10  # one order in ten


async def fill(database_url: str, orders: int, seed: int) -> None:
    from service.config import load_settings
    from service.db import make_engine, make_sessionmaker, session_scope
    from service.ledger.models import SyncSource
    from service.ledger.write import write_order
    from service.sandbox import scenario
    from service.sandbox.world import World
    from tests.support.reconciled import truth_of

    engine = make_engine(database_url, load_settings(database_url=database_url))
    sessions = make_sessionmaker(engine)
    try:
        for start in range(0, orders, CHUNK):
            # A world per chunk: one world's bookkeeping grows with its orders.
            world = World(seed=seed + start, clock=lambda: datetime(2026, 11, 28, 8, tzinfo=UTC))
            rng = random.Random(seed + start)
            made = scenario.generate(world, rng, orders=min(CHUNK, orders - start), steps=6)
            async with session_scope(sessions) as session:
                for order in made:
                    truth = truth_of(order, "camel", fetched_at=datetime.now(UTC))
                    await write_order(session, "acct-bench", truth, source=SyncSource.SWEEP)
    finally:
        await engine.dispose()


async def spoil(database_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        done = await conn.execute(
            "UPDATE orders SET status = 'unknown', total_amount = NULL "
            f"WHERE id % {SPOILED_SHARE} = 0"
        )
        await conn.execute("VACUUM ANALYZE")
        return int(done.split()[-1])
    finally:
        await conn.close()


async def floor(database_url: str, batch_size: int) -> tuple[float, int]:
    """Read and map every order's stored payloads, as remap does, without writing."""
    from service.config import load_settings
    from service.db import make_engine, make_sessionmaker, session_scope
    from service.pandapon.errors import MalformedResponse
    from workers.remap import _load_batch, rederive

    engine = make_engine(database_url, load_settings(database_url=database_url))
    sessions = make_sessionmaker(engine)
    started, after, mapped = time.perf_counter(), 0, 0
    try:
        while True:
            async with session_scope(sessions) as session:
                batch = await _load_batch(session, after, batch_size, None)
            if not batch:
                break
            for stored in batch:
                try:
                    rederive(stored)
                    mapped += 1
                except MalformedResponse:
                    pass
            after = batch[-1].pk
    finally:
        await engine.dispose()
    return time.perf_counter() - started, mapped


def run_remap(database_url: str, batch_size: int) -> tuple[float, str, int]:
    """The real command: (wall seconds, its last output line, peak RSS in MiB)."""
    env = {"PANDASYNC_DATABASE_URL": database_url, "PANDASYNC_LOG_FORMAT": "json"}
    started = time.perf_counter()
    done = subprocess.run(
        [PANDASYNC, "remap", "--batch-size", str(batch_size)],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    # The largest RSS of any child so far: the first run's, as it is the first child.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    last = [line for line in done.stdout.splitlines() if line.startswith("remapped")][-1]
    return wall, last, peak // 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remap", description=__doc__)
    parser.add_argument("--large", action="store_true", help="100,000 orders")
    parser.add_argument("--orders", type=int, help="orders in the ledger")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--database-url", help="postgresql+asyncpg://… server for a scratch db")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)
    orders = args.orders or (100_000 if args.large else 5_000)
    server = server_url(args.database_url)
    name, database_url = create_database(server, "pandasync_bench_remap")
    try:
        started = time.perf_counter()
        asyncio.run(fill(database_url, orders, args.seed))
        filled = time.perf_counter() - started
        spoiled = asyncio.run(spoil(database_url))
        print(f"filled {orders:,} orders in {filled:.0f} s; spoiled {spoiled:,}", flush=True)
        first, first_line, peak = run_remap(database_url, args.batch_size)
        print(f"run 1: {first:.1f} s  {first_line}", flush=True)
        second, second_line, _ = run_remap(database_url, args.batch_size)
        print(f"run 2: {second:.1f} s  {second_line}", flush=True)
        base, mapped = asyncio.run(floor(database_url, args.batch_size))
        print(f"floor (read + map, no write): {base:.1f} s for {mapped:,} orders", flush=True)
        print()
        print(f"remap of {orders:,} orders, batches of {args.batch_size}:")
        print(f"  run 1 (puts back {spoiled:,}): {first:7.1f} s  {orders / first:8,.0f} orders/s")
        print(f"  run 2 (nothing to do):  {second:7.1f} s  {orders / second:8,.0f} orders/s")
        print(f"  floor (read + map):     {base:7.1f} s  {orders / base:8,.0f} orders/s")
        print(f"  run 2 / floor: {second / base:.2f}x   peak RSS of the command: {peak} MiB")
        again = re.search(r": ([\d,]+) written again, ([\d,]+) changed", second_line)
        ok = again is not None and again.groups() == ("0", "0")
        if not ok:
            print("INVALID: the second run wrote something")
        return 0 if ok else 1
    finally:
        if not args.keep:
            drop_database(server, name)


if __name__ == "__main__":
    sys.exit(main())
