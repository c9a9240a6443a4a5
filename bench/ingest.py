"""Ingest benchmark: the real webhook endpoint against two baselines, in one run.

    uv run python -m bench.ingest            # small: 1 round of 5 s per endpoint
    uv run python -m bench.ingest --large    # 3 rounds of 15 s per endpoint

Three servers, each ONE uvicorn process (uvloop + httptools) on the same database, driven by
the same load generator (wrk, 32 connections, 2 threads) with the same request stream:

- ``bare``:  a Starlette endpoint that reads the body and answers 200;
- ``naive``: the same plus one asyncpg ``INSERT`` into webhook_inbox per request (autocommit);
- ``real``:  ``service.app.create_app`` as deployed (JSON logs, broker), in the callback
  authentication of ``--auth``: ``auto`` (the default setting, requests on the token URL) or
  ``signature`` (requests on ``/webhooks/pandapon``, nonces claimed).

Every request is a fresh, validly signed PandaPon callback for a new order, signed just before
the run (wrk's Lua script reads pre-signed requests from files, one line each, so the load
generator does no hashing). Rounds alternate the endpoints; the table shows medians of the
rounds. A run is only counted when every response was a 2xx, and for ``real`` when the inbox
holds exactly one row per answered request.

Postgres: ``--database-url`` (a server where a scratch database may be created), else
``PANDASYNC_TEST_DATABASE_URL``, else an embedded server. Broker for ``real``: ``--broker-url``
(default ``redis://127.0.0.1:6379/14`` when reachable, else the in-process stub). wrk is
installed with apt-get when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from service.db import asyncpg_dsn, with_database
from service.pandapon.signer import DEFAULT_SIGNER, new_nonce, timestamp_now

ACCESS_KEY = "ak-bench-0001"
ACCESS_SECRET = "secret-bench-0123456789abcdef"
USER_ID = "acct-bench"
PATH = "/webhooks/pandapon"
TOKEN = "bench-token-0123456789abcdef"
AUTH_MODES = ("auto", "signature")
KINDS = ("bare", "naive", "real")
WARMUP_S = 2
WRK_THREADS = 2

LUA = r"""
local next_id = 0
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end

function init(args)
  prefix = args[1]
  file = io.open(prefix .. "." .. tid, "r")
  wrapped = 0
end

function request()
  local line = file:read("*l")
  if line == nil then
    file:seek("set", 0)
    wrapped = wrapped + 1
    line = file:read("*l")
  end
  local ts, nonce, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["access-key"] = "@KEY@",
    ["user-id"] = "@USER@",
    ["timestamp"] = ts,
    ["nonce-str"] = nonce,
    ["signature"] = sig,
  }, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True)
class Result:
    kind: str
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    rows: int | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def valid(self) -> bool:
        # wrk counts the requests answered inside its window; up to one request per
        # connection of the warm-up, and of the run's end, is stored just outside it.
        rows_ok = self.rows is None or self.requests <= self.rows <= self.requests + 64
        return self.non_2xx == 0 and self.socket_errors == 0 and rows_ok


# --- the three servers ----------------------------------------------------------------------


def _bare_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    async def endpoint(request: Request) -> Response:
        await request.body()
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=_routes(endpoint))


def _routes(endpoint: Any) -> list[Any]:
    """The baselines answer on both webhook paths, so every endpoint sees the same URL."""
    from starlette.routing import Route

    return [Route(p, endpoint, methods=["POST"]) for p in (PATH, f"{PATH}/{{token}}")]


def _naive_app(database_url: str, pool_size: int) -> Any:
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    pools: list[asyncpg.Pool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pools.append(await asyncpg.create_pool(asyncpg_dsn(database_url), max_size=pool_size))
        yield
        await pools[0].close()

    async def endpoint(request: Request) -> Response:
        body = await request.body()
        await pools[0].execute(
            "INSERT INTO webhook_inbox (account_id, dedupe_key, message_type, kind, raw_body, "
            "headers) VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
            USER_ID,
            hashlib.sha256(body).hexdigest(),
            "BENCH",
            "other",
            body,
            json.dumps(dict(request.headers)),
        )
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=_routes(endpoint), lifespan=lifespan)


def _real_app(database_url: str, broker_url: str | None, auth: str) -> Any:
    from service.app import create_app
    from service.config import load_settings
    from service.logs import configure_logging

    settings = load_settings(
        database_url=database_url,
        broker_url=broker_url,
        access_key=ACCESS_KEY,
        access_secret=ACCESS_SECRET,
        user_id=USER_ID,
        webhook_auth=auth,
        webhook_token=TOKEN if auth == "auto" else None,
        log_format="json",
    )
    configure_logging(os.environ.get("BENCH_LOG_LEVEL", "INFO"), "json")
    return create_app(settings)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.config import load_settings

    options: dict[str, Any] = {"http": "httptools", "log_config": None}
    if args.kind == "bare":
        app = _bare_app()
    elif args.kind == "naive":
        app = _naive_app(args.database_url, load_settings().db_pool_size)
    else:
        from service.webhooks.limits import web_server_options

        app = _real_app(args.database_url, args.broker_url or None, args.auth)
        options = web_server_options(load_settings())  # as deployed: with its HTTP limits
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        access_log=False,
        log_level="warning",
        **options,
    )


# --- the harness ----------------------------------------------------------------------------


async def _admin(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _query(url: str, statement: str) -> Any:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetchval(statement)
    finally:
        await conn.close()


def _ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing it with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk could not be installed")
    return found


def _redis_reachable(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _envelope(order_no: int, run_tag: str) -> bytes:
    order_id = f"{run_tag}{order_no:012d}"
    envelope = {
        "messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY",
        "messagePlatform": 0,
        "timestamp": str(int(time.time() * 1000)),
        "messageBody": {
            "salesOrderId": order_id,
            "subOrders": [
                {
                    "purchase_order_outer_id": order_id,
                    "purchase_order_line_outer_id": f"{order_id}1",
                    "product_amount": 10000,
                    "quantity": 2,
                    "logistic_company_name": None,
                    "logistic_number": None,
                }
            ],
            "purchaseOrderPriceDTO": {
                "purchaseCurrency": "CNY",
                "purchaseTotalFee": 10500,
                "purchaseProductFee": 10000,
                "purchaseShippingFee": 500,
            },
        },
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def write_requests(prefix: Path, count: int) -> None:
    """``count`` freshly signed requests, split over one file per wrk thread."""
    run_tag = uuid.uuid4().hex[:8]
    files = [open(f"{prefix}.{t}", "w") for t in range(WRK_THREADS)]  # noqa: SIM115
    try:
        for n in range(count):
            timestamp = timestamp_now("ms")
            nonce = new_nonce()
            signature = DEFAULT_SIGNER.sign(ACCESS_KEY, timestamp, nonce, ACCESS_SECRET)
            body = _envelope(n, run_tag).decode()
            files[n % WRK_THREADS].write(f"{timestamp}\t{nonce}\t{signature}\t{body}\n")
    finally:
        for f in files:
            f.close()


def webhook_path(auth: str) -> str:
    return f"{PATH}/{TOKEN}" if auth == "auto" else PATH


def run_wrk(wrk: str, script: Path, url: str, prefix: Path, seconds: int, conns: int) -> Result:
    command = [
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{conns}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
        "--",
        str(prefix),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    requests, duration_us, p50_us, p99_us, non_2xx, errors = map(int, line.split()[1:])
    return Result("", requests, duration_us / 1e6, p50_us / 1000, p99_us / 1000, non_2xx, errors)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    kind: str, database_url: str, broker_url: str, auth: str, log_file: Path
) -> tuple[Any, int]:
    port = _free_port()
    command = [sys.executable, "-m", "bench.ingest", "serve", "--kind", kind, "--port", str(port)]
    command += ["--database-url", database_url, "--broker-url", broker_url, "--auth", auth]
    log = open(log_file, "ab")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {kind} server exited; see {log_file}")
        # uvicorn listens only once the app's lifespan has started.
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the {kind} server did not start; see {log_file}")


def stop_server(process: Any) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _reset(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("TRUNCATE webhook_inbox, webhook_nonces RESTART IDENTITY CASCADE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def bench_one(
    kind: str,
    round_no: int,
    *,
    wrk: str,
    workdir: Path,
    database_url: str,
    broker_url: str,
    auth: str,
    seconds: int,
    conns: int,
    max_rate: int,
) -> Result:
    asyncio.run(_reset(database_url))
    script = workdir / "ingest.lua"
    warm, main = workdir / f"{kind}-{round_no}-warm", workdir / f"{kind}-{round_no}-main"
    # Signed just before the run, so every timestamp is well inside the tolerance.
    write_requests(warm, max_rate * WARMUP_S)
    write_requests(main, max_rate * seconds)
    process, port = start_server(kind, database_url, broker_url, auth, workdir / f"{kind}.log")
    url = f"http://127.0.0.1:{port}{webhook_path(auth)}"
    try:
        run_wrk(wrk, script, url, warm, WARMUP_S, conns)
        before = asyncio.run(_query(database_url, "SELECT count(*) FROM webhook_inbox"))
        result = run_wrk(wrk, script, url, main, seconds, conns)
        after = asyncio.run(_query(database_url, "SELECT count(*) FROM webhook_inbox"))
    finally:
        stop_server(process)
    rows = int(after - before) if kind == "real" else None
    return Result(
        kind,
        result.requests,
        result.duration_s,
        result.p50_ms,
        result.p99_ms,
        result.non_2xx,
        result.socket_errors,
        rows,
    )


def report(
    results: list[Result], conns: int, seconds: int, rounds: int, broker: str, auth: str
) -> str:
    medians: dict[str, tuple[float, float, float]] = {}
    lines = [
        f"ingest: {rounds} round(s) x {seconds} s per endpoint, {conns} connections, "
        f"wrk -t{WRK_THREADS}, one uvicorn process each; broker for real: {broker}; "
        f"auth for real: {auth} on {webhook_path(auth).replace(TOKEN, '<token>')}",
        "",
        f"{'endpoint':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}   rounds (req/s)",
    ]
    for kind in KINDS:
        mine = [r for r in results if r.kind == kind]
        rps = statistics.median(r.rps for r in mine)
        p50 = statistics.median(r.p50_ms for r in mine)
        p99 = statistics.median(r.p99_ms for r in mine)
        medians[kind] = (rps, p50, p99)
        per_round = ", ".join(f"{r.rps:.0f}{'' if r.valid else ' INVALID'}" for r in mine)
        lines.append(f"{kind:<8} {rps:>9.0f} {p50:>8.2f} {p99:>8.2f}   {per_round}")
    real, naive, bare = medians["real"][0], medians["naive"][0], medians["bare"][0]
    lines += [
        "",
        f"real / naive throughput: {real / naive:.2f}x",
        f"real / bare throughput:  {real / bare:.2f}x",
        f"naive / bare throughput: {naive / bare:.2f}x",
    ]
    for r in results:
        if not r.valid:
            lines.append(
                f"INVALID: {r.kind}: {r.non_2xx} non-2xx, {r.socket_errors} socket errors, "
                f"{r.rows} rows for {r.requests} requests"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    wrk = _ensure_wrk()
    seconds = args.duration or (15 if args.large else 5)
    rounds = args.rounds or (3 if args.large else 1)
    server_url = args.database_url or os.environ.get("PANDASYNC_TEST_DATABASE_URL")
    workdir = Path(tempfile.mkdtemp(prefix="pandasync-bench-ingest-"))
    if not server_url:
        from service.embedded import start_embedded

        server_url = start_embedded(workdir / "pg", database="postgres")
    broker_url = args.broker_url
    if broker_url is None:
        default = "redis://127.0.0.1:6379/14"
        broker_url = default if _redis_reachable(default) else ""
    name = f"pandasync_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    database_url = with_database(server_url, name)
    try:
        from service.ledger.migrations import run_migrations

        run_migrations(database_url)
        (workdir / "ingest.lua").write_text(
            LUA.replace("@KEY@", ACCESS_KEY).replace("@USER@", USER_ID)
        )
        results: list[Result] = []
        for round_no in range(rounds):
            for kind in KINDS if round_no % 2 == 0 else tuple(reversed(KINDS)):
                result = bench_one(
                    kind,
                    round_no,
                    wrk=wrk,
                    workdir=workdir,
                    database_url=database_url,
                    broker_url=broker_url,
                    auth=args.auth,
                    seconds=seconds,
                    conns=args.connections,
                    max_rate=args.max_rate,
                )
                print(
                    f"round {round_no + 1} {kind:<5}: {result.rps:8.0f} req/s  "
                    f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                    f"{'' if result.valid else '  INVALID'}",
                    flush=True,
                )
                results.append(result)
        print()
        broker = broker_url or "in-process stub"
        print(report(results, args.connections, seconds, rounds, broker, args.auth))
        return 0 if all(r.valid for r in results) else 1
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if broker_url:
            import redis

            client = redis.Redis.from_url(broker_url)
            for key in client.scan_iter("pandasync:*"):
                client.delete(key)
            client.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--large", action="store_true", help="3 rounds of 15 s per endpoint")
    parser.add_argument("--duration", type=int, help="seconds per endpoint and round")
    parser.add_argument("--rounds", type=int, help="rounds (endpoints alternate order)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--max-rate",
        type=int,
        default=15_000,
        help="requests per second to pre-sign for; a faster endpoint would replay nonces",
    )
    parser.add_argument("--database-url", help="postgresql+asyncpg://… server for a scratch db")
    parser.add_argument("--broker-url", help="broker for the real endpoint ('' = in-process)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="auto",
        help="the real endpoint's PANDASYNC_WEBHOOK_AUTH (auto: requests on the token URL)",
    )
    server = sub.add_parser("serve", help="(internal) run one of the servers")
    server.add_argument("--kind", choices=KINDS, required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--database-url", required=True)
    server.add_argument("--broker-url", default="")
    server.add_argument("--auth", choices=AUTH_MODES, default="auto")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
