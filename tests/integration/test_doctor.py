"""``pandasync doctor`` as an operator runs it, against the sandbox over real sockets.

The sandbox plays each way the real PandaPon may differ from our assumptions (another timestamp
unit, a moved endpoint, callbacks signed another way or not at all); in each the doctor must name
the setting to change, and pass once it is changed. The evidence's snake_case payloads need no
setting: the mapping reads both spellings, so the doctor passes on them as they are.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from service.ledger.models import Platform
from service.pandapon.endpoints import ENDPOINT_NAMES
from service.sandbox.remote import SandboxRemote
from tests.support.servers import SandboxServer

pytest_plugins = ["tests.support.sandbox"]
pytestmark = pytest.mark.timeout(120)

PANDASYNC = str(Path(sys.executable).parent / "pandasync")
TOKEN = "doctor-test-token-0123456789"
MOVED_PATH = "/open/order/get"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def doctor_env(server: SandboxServer, **extra: str) -> dict[str, str]:
    """The environment of an operator pointing the service at this sandbox."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    env.update(
        {
            "PANDASYNC_API_BASE_URL": server.url,
            "PANDASYNC_ACCESS_KEY": server.settings.access_key,
            "PANDASYNC_ACCESS_SECRET": server.settings.access_secret.get_secret_value(),
            "PANDASYNC_USER_ID": server.settings.user_id,
            "PANDASYNC_WEBHOOK_AUTH": "auto",
            "PANDASYNC_WEBHOOK_TOKEN": TOKEN,
            **extra,
        }
    )
    return env


async def doctor(
    server: SandboxServer, tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    # tmp_path as the working directory: no .env of the checkout is read.
    return await asyncio.to_thread(
        subprocess.run,
        [PANDASYNC, "doctor", *args],
        env=doctor_env(server, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def populate(remote: SandboxRemote) -> None:
    """On each platform: an order paid, shipped with a trace step and refunded in part, and
    one awaiting payment."""
    for platform in (Platform.TAOBAO, Platform.ALIBABA_1688):
        order = await remote.create_order(
            platform, [{"title": "袜子", "quantity": 2, "unit_price": "5"}], shipping_fee="1"
        )
        await remote.pay(platform, order["order_id"])
        await remote.ship(
            platform, order["order_id"], events=[{"description": "快件已揽收", "status": "ACCEPT"}]
        )
        line_id = order["lines"][0]["line_id"]
        await remote.open_refund(platform, order["order_id"], "2", line_id=line_id)
        await remote.create_order(platform)
    # The sandbox stamps each change a second after the last one of its order, so a quick run
    # of changes leaves modification times a few seconds ahead of the clock, outside a list
    # window that ends now: wait until they are in the past, as upstream's always are.
    latest = max(datetime.fromisoformat(o["modified_at"]) for o in await remote.orders())
    await asyncio.sleep(max(0.0, (latest - datetime.now(UTC)).total_seconds()) + 1.0)


def lines_of(result: subprocess.CompletedProcess[str], mark: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(mark)]


def printed_overrides(stdout: str) -> dict[str, Any]:
    match = re.search(r"^  PANDASYNC_ENDPOINT_OVERRIDES=(.*)$", stdout, re.MULTILINE)
    assert match, stdout
    value: dict[str, Any] = json.loads(shlex.split(match.group(1))[0])
    return value


# --- upstream -----------------------------------------------------------------------------------


async def test_the_default_sandbox_passes_and_only_the_table_is_called(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    remote = sandbox_server.remote
    await populate(remote)
    await remote.reset_calls()
    result = await doctor(sandbox_server, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not lines_of(result, "✗")
    assert not lines_of(result, "?")
    # credentials, every endpoint, three shapes per platform, the webhook
    assert f"all {1 + len(ENDPOINT_NAMES) + 6 + 1} checks passed" in result.stdout
    for name in ENDPOINT_NAMES:
        assert f"✓ {name}: " in result.stdout
    assert "✓ shapes taobao refund" in result.stdout
    assert "✓ shapes 1688 logistics" in result.stdout
    assert f"/webhooks/pandapon/{TOKEN}" in result.stdout
    assert result.stderr == ""
    # Every request reached an endpoint of the table: nothing else was asked for.
    assert set(await remote.outcomes()) <= set(ENDPOINT_NAMES)  # no "unrouted" entry
    calls = await remote.calls()
    assert all(calls[name] > 0 for name in ENDPOINT_NAMES)


@pytest.mark.parametrize("wanted", ["s", "ms"])
async def test_the_timestamp_unit_pandapon_wants_is_named(
    sandbox_server: SandboxServer, tmp_path: Path, wanted: str
) -> None:
    await populate(sandbox_server.remote)
    await sandbox_server.remote.set_upstream(timestamp_unit=wanted)
    configured = "ms" if wanted == "s" else "s"
    result = await doctor(sandbox_server, tmp_path, PANDASYNC_TIMESTAMP_UNIT=configured)
    assert result.returncode == 1, result.stdout
    assert f"✗ credentials: refused with the timestamp in {configured}, accepted in {wanted}" in (
        result.stdout
    )
    assert f"  PANDASYNC_TIMESTAMP_UNIT={wanted}" in result.stdout
    assert len(lines_of(result, "✗")) == 1  # the rest ran with the unit that works
    fixed = await doctor(sandbox_server, tmp_path, PANDASYNC_TIMESTAMP_UNIT=wanted)
    assert fixed.returncode == 0, fixed.stdout


@pytest.mark.parametrize(
    ("endpoint", "move", "key"),
    [
        ("taobao_order_detail", {"path": MOVED_PATH}, "path"),
        ("alibaba_order_list", {"method": "GET"}, "method"),
        ("alibaba_refund_detail", {"path": "/alibaba/refund/get"}, "path"),
    ],
)
async def test_a_moved_endpoint_is_named_and_the_printed_override_fixes_it(
    sandbox_server: SandboxServer, tmp_path: Path, endpoint: str, move: dict[str, str], key: str
) -> None:
    await populate(sandbox_server.remote)
    await sandbox_server.remote.set_upstream(endpoints={endpoint: move})
    result = await doctor(sandbox_server, tmp_path)
    assert result.returncode == 1, result.stdout
    (failed,) = [line for line in lines_of(result, "✗") if line.startswith(f"✗ {endpoint}:")]
    assert "PANDASYNC_ENDPOINT_OVERRIDES=" in failed
    assert f'"{key}"' in failed
    overrides = printed_overrides(result.stdout)
    assert list(overrides) == [endpoint]
    assert list(overrides[endpoint]) == [key]
    if key == "path":
        assert overrides[endpoint]["path"] == "/…"  # cannot be guessed: the operator fills it
        overrides[endpoint]["path"] = move["path"]
    else:
        assert overrides[endpoint] == move
    fixed = await doctor(
        sandbox_server, tmp_path, PANDASYNC_ENDPOINT_OVERRIDES=json.dumps(overrides)
    )
    assert fixed.returncode == 0, fixed.stdout
    assert f"✓ {endpoint}: " in fixed.stdout
    assert f"(overridden: {key})" in fixed.stdout


async def test_snake_case_payloads_pass_as_the_mapping_reads_both_spellings(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    """The evidence's spelling (docs/upstream.md#evidence): snake_case Taobao payloads, the nested
    refund record, SIGNED parcels, and 1688's 500_2 for an order not shipped yet."""
    await populate(sandbox_server.remote)
    await sandbox_server.remote.set_upstream(payload_case="snake")
    result = await doctor(sandbox_server, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not lines_of(result, "✗")
    for shape in ("order", "logistics", "refund"):
        assert f"✓ shapes taobao {shape}: " in result.stdout
    # A field found in either spelling is not "missing"; the camel names are not asked for.
    for camel in ("salesOrderId", "subOrders", "purchaseOrderPriceDTO", "gmtModified"):
        assert camel not in result.stdout
    # Named by id, an order not shipped yet is checked too: 1688 answers 500_2, no parcels.
    orders = await sandbox_server.remote.orders("1688")
    waiting = next(o["order_id"] for o in orders if o["status"] == "pending_payment")
    pinned = await doctor(sandbox_server, tmp_path, "--order", f"1688:{waiting}")
    assert pinned.returncode == 0, pinned.stdout
    assert "✓ alibaba_logistics: " in pinned.stdout
    assert "(an order not shipped yet)" in pinned.stdout
    assert (await sandbox_server.remote.outcomes())["alibaba_logistics"].get("not_shipped", 0) > 0


async def test_no_order_on_a_platform_cannot_be_checked(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    result = await doctor(sandbox_server, tmp_path)
    assert result.returncode == 2, result.stdout
    assert "? shapes taobao: no order found in the last 90 days" in result.stdout
    assert "pass --order taobao:ID" in result.stdout
    assert not lines_of(result, "✗")  # made-up ids proved every endpoint


# --- failures an operator meets: one line, never a traceback ------------------------------------


async def test_wrong_credentials_name_the_settings(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    result = await doctor(sandbox_server, tmp_path, PANDASYNC_ACCESS_SECRET="not-the-secret")
    assert result.returncode == 1
    assert "✗ credentials: refused (HTTP 401" in result.stdout
    assert "PANDASYNC_ACCESS_SECRET" in result.stdout
    denied = await doctor(sandbox_server, tmp_path, PANDASYNC_USER_ID="someone-else")
    assert "HTTP 403" in denied.stdout
    assert "PANDASYNC_USER_ID" in denied.stdout


async def test_unreachable_host_bad_settings_and_no_credentials_are_one_line(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = await doctor(sandbox_server, tmp_path, PANDASYNC_API_BASE_URL=closed)
    assert unreachable.returncode == 1
    assert f"✗ credentials: cannot reach {closed}" in unreachable.stdout
    bad = await doctor(sandbox_server, tmp_path, PANDASYNC_PUBLIC_URL="sync.example.com")
    assert bad.returncode == 2
    assert "PANDASYNC_PUBLIC_URL" in bad.stderr
    no_key = await doctor(sandbox_server, tmp_path, PANDASYNC_ACCESS_KEY="")
    assert no_key.returncode == 2
    assert "PANDASYNC_ACCESS_KEY" in no_key.stderr
    overrides = await doctor(
        sandbox_server, tmp_path, PANDASYNC_ENDPOINT_OVERRIDES='{"taobao_pay": {"path": "/x"}}'
    )
    assert overrides.returncode == 2
    assert "unknown endpoint 'taobao_pay'" in overrides.stderr
    for result in (unreachable, bad, no_key, overrides):
        assert "Traceback" not in result.stdout + result.stderr
        assert len(result.stderr.splitlines()) <= 2


# --- the webhook side ---------------------------------------------------------------------------


async def listen(
    server: SandboxServer,
    tmp_path: Path,
    *,
    path: str = f"/webhooks/pandapon/{TOKEN}",
    seconds: float = 3,
    send: bool = True,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """``doctor --listen``; once it listens, the sandbox delivers one order's callback to it."""
    port = free_port()
    args = [PANDASYNC, "doctor", "--listen", str(seconds), "--port", str(port)]
    process = await asyncio.create_subprocess_exec(
        *args,
        env=doctor_env(server, **env),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    head: list[str] = []
    while not head or not head[-1].startswith("listening on"):
        line = (await process.stdout.readline()).decode()
        assert line, "".join(head)
        head.append(line)
    if send:
        await server.remote.configure_delivery(webhook_url=f"http://127.0.0.1:{port}{path}")
        await server.remote.create_order("taobao")
        await server.remote.drain()
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    stdout = "".join(head) + out.decode()
    return subprocess.CompletedProcess(args, process.returncode or 0, stdout, err.decode())


def callback_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("  · callback 1:")]
    assert lines, result.stdout
    return lines[0]


@pytest.mark.parametrize(
    ("delivery", "state", "says"),
    [
        ({"signing": "md5"}, "signature valid", "signed as we sign"),
        ({"signing": "none"}, "signature absent", "unsigned"),
        ({"signing": "other_secret"}, "signature mismatch", "signed some other way"),
        ({"signing": "hmac_sha256"}, "signature absent", "signed some other way (authorization)"),
        ({"timestamp_skew_s": -3600}, "signature stale", "but stale: timestamp 360"),
    ],
)
async def test_listen_says_how_callbacks_are_signed(
    sandbox_server: SandboxServer,
    tmp_path: Path,
    delivery: dict[str, Any],
    state: str,
    says: str,
) -> None:
    await populate(sandbox_server.remote)
    await sandbox_server.remote.configure_delivery(**delivery)
    result = await listen(sandbox_server, tmp_path)
    line = callback_line(result)
    assert f"{state}: " in line
    assert says in line
    assert "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE: status, known type, taobao" in line
    assert "token right" in line
    assert line.endswith("; accepted")
    # On the token URL in auto mode every one of them is accepted.
    assert "✓ callbacks: 1 " in result.stdout
    assert result.returncode == 0, result.stdout


async def test_listen_on_the_bare_path_asks_for_the_token_url_when_unsigned(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    await populate(sandbox_server.remote)
    await sandbox_server.remote.configure_delivery(signing="hmac_sha256")
    result = await listen(sandbox_server, tmp_path, path="/webhooks/pandapon")
    assert "token none" in callback_line(result)
    assert "refused (missing_header)" in callback_line(result)
    assert re.search(r"^✗ callbacks: .*PANDASYNC_WEBHOOK_AUTH=auto", result.stdout, re.MULTILINE)
    assert "  PANDASYNC_WEBHOOK_AUTH=auto" in result.stdout
    assert result.returncode == 1


async def test_listen_names_the_callbacks_timestamp_unit(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    await populate(sandbox_server.remote)
    await sandbox_server.remote.configure_delivery(timestamp_unit="s")
    result = await listen(sandbox_server, tmp_path)
    assert "signed as we sign, with the timestamp in s" in callback_line(result)
    assert "  PANDASYNC_TIMESTAMP_UNIT=s" in result.stdout
    assert result.returncode == 1


async def test_listen_with_nothing_arriving_says_what_to_do(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    await populate(sandbox_server.remote)
    result = await listen(sandbox_server, tmp_path, seconds=1, send=False)
    assert "? callbacks: none in 1 s: during --listen press Verify" in result.stdout
    assert result.returncode == 2


async def test_listen_on_a_taken_port_is_one_line(
    sandbox_server: SandboxServer, tmp_path: Path
) -> None:
    await populate(sandbox_server.remote)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await doctor(sandbox_server, tmp_path, "--listen", "1", "--port", str(port))
    assert f"? callbacks: cannot listen on 127.0.0.1:{port}" in result.stdout
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
