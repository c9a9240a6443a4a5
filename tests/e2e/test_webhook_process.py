"""``pandasync serve`` as its own process: JSON logs carry request ids and never a secret, and
a signature mode without credentials stops it at startup with a clear message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.webhook_requests import (
    ACCESS_KEY,
    ACCESS_SECRET,
    TOKEN,
    USER_ID,
    WEBHOOK,
    encode,
    signed,
    taobao_status,
)

pytestmark = pytest.mark.e2e

PANDASYNC = str(Path(sys.executable).with_name("pandasync"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(database_url: str, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    env.update(
        {
            "PANDASYNC_DATABASE_URL": database_url,
            "PANDASYNC_ACCESS_KEY": ACCESS_KEY,
            "PANDASYNC_ACCESS_SECRET": ACCESS_SECRET,
            "PANDASYNC_USER_ID": USER_ID,
            "PANDASYNC_WEBHOOK_AUTH": "signature",
            "PANDASYNC_WEBHOOK_TOKEN": TOKEN,
            "PANDASYNC_LOG_FORMAT": "json",
            "PANDASYNC_LOG_LEVEL": "DEBUG",
            **values,
        }
    )
    return env


@contextmanager
def serve(
    env: dict[str, str], cwd: Path, port: int, *options: str
) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [PANDASYNC, "serve", "--port", str(port), *options],
        env=env,
        cwd=cwd,  # away from any .env file of the checkout
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def wait_ready(process: subprocess.Popen[str], base_url: str) -> None:
    for _ in range(300):  # a bound on a hang, not a timing assertion
        if process.poll() is not None:
            raise AssertionError("pandasync serve exited during startup")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("pandasync serve did not start")


def test_logs_are_json_with_request_ids_and_no_secrets(
    fresh_database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    headers = signed()
    with serve(environment(fresh_database_url), tmp_path, port) as process:
        wait_ready(process, base_url)
        with httpx.Client(base_url=base_url, timeout=10) as client:
            stored = client.post(
                f"{WEBHOOK}/{TOKEN}",
                content=encode(taobao_status()),
                headers={**headers, "x-request-id": "e2e-stored"},
            )
            refused = client.post(
                f"{WEBHOOK}/{TOKEN}",
                content=encode(taobao_status()),
                headers={**signed(), "signature": "0" * 32, "x-request-id": "e2e-refused"},
            )
        process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        output = process.stdout.read()
    assert (stored.status_code, refused.status_code) == (200, 401)
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    by_event = {e["event"]: e for e in events}
    assert by_event["webhook.stored"]["request_id"] == "e2e-stored"
    assert by_event["webhook.refused"]["request_id"] == "e2e-refused"
    assert by_event["webhook.refused"]["reason"] == "bad_signature"
    for secret in (ACCESS_SECRET, TOKEN, headers["signature"]):
        assert secret not in output


def test_signature_mode_without_credentials_does_not_start(
    fresh_database_url: str, tmp_path: Path
) -> None:
    env = environment(fresh_database_url)
    del env["PANDASYNC_ACCESS_SECRET"]
    with serve(env, tmp_path, free_port()) as process:
        process.wait(60)
        assert process.stdout is not None
        output = process.stdout.read()
    assert process.returncode != 0
    assert "PANDASYNC_ACCESS_KEY and PANDASYNC_ACCESS_SECRET" in output
    assert "Traceback" not in output


def test_default_mode_says_what_it_accepts_and_takes_unsigned_callbacks_on_the_token_url(
    fresh_database_url: str, tmp_path: Path
) -> None:
    env = environment(fresh_database_url)
    del env["PANDASYNC_WEBHOOK_AUTH"]  # the default: auto
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with serve(env, tmp_path, port) as process:
        wait_ready(process, base_url)
        with httpx.Client(base_url=base_url, timeout=10) as client:
            body = encode(taobao_status())
            unsigned = {"content-type": "application/json"}
            on_token_url = client.post(f"{WEBHOOK}/{TOKEN}", content=body, headers=unsigned)
            without_token = client.post(WEBHOOK, content=body, headers=unsigned)
        process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        output = process.stdout.read()
    assert (on_token_url.status_code, without_token.status_code) == (200, 401)
    [line] = [line for line in output.splitlines() if "callbacks accepted" in line]
    assert "/webhooks/pandapon/<PANDASYNC_WEBHOOK_TOKEN> signed or not" in line
    assert "PANDASYNC_WEBHOOK_AUTH=auto" in line
    assert TOKEN not in output


def metric(text: str, name: str) -> float:
    [value] = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


def test_metrics_of_several_web_processes_are_one_exposition(
    fresh_database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    posts = 40
    with serve(environment(fresh_database_url), tmp_path, port, "--workers", "2") as process:
        wait_ready(process, base_url)
        for _ in range(posts):
            # A connection each, so that both processes take some of them.
            with httpx.Client(base_url=base_url, timeout=10) as client:
                answer = client.post(
                    f"{WEBHOOK}/{TOKEN}", content=encode(taobao_status()), headers=signed()
                )
                assert answer.status_code == 200
        scrapes = []
        for _ in range(6):
            with httpx.Client(base_url=base_url, timeout=10) as client:
                scrapes.append(client.get("/metrics").text)
    # Whichever process answers, it reports the requests of both.
    for text in scrapes:
        assert metric(text, "pandasync_webhook_received_total") == posts
        accepted = 'pandasync_webhook_accepted_total{account="default",kind="status"}'
        assert metric(text, accepted) == posts
