"""The web role's HTTP limits, over raw sockets against uvicorn as ``pandasync serve`` runs it.

Each test starts the real app under uvicorn with ``web_server_options`` (what ``serve`` and
``dev`` use) and short limits set by settings, then misbehaves as a hostile client would: a
head too large or never finished, a body never finished, too many connections, an idle
keep-alive. Waits are bounded by the short settings (about a second), never by the defaults.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.app import create_app
from service.config import Settings
from service.webhooks.limits import web_server_options
from tests.support.servers import uvicorn_thread
from tests.support.webhook_checks import count
from tests.support.webhook_requests import WEBHOOK, encode, receiver_settings, signed, taobao_status

Address = tuple[str, int]

HEADER_LIMIT = 8192
HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.5
KEEP_ALIVE_S = 1
# How long past a limit's time a test waits for it to act: generous, the machine is shared.
MARGIN_S = 1.5
HEALTHZ_AND_CLOSE = b"GET /healthz HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"


def limited_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "max_header_bytes": HEADER_LIMIT,
        "header_timeout_s": HEADER_TIMEOUT_S,
        "body_timeout_s": BODY_TIMEOUT_S,
        "keep_alive_timeout_s": KEEP_ALIVE_S,
        **overrides,
    }
    return receiver_settings(database_url, **values)


@contextmanager
def web_role(settings: Settings) -> Iterator[Address]:
    """The app under uvicorn with the web role's options, in a thread; yields its address."""
    options = {**web_server_options(settings), "timeout_graceful_shutdown": 1}
    with uvicorn_thread(create_app(settings), **options) as address:
        yield address


def connect(address: Address) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def head(path: str = WEBHOOK, **fields: str) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"POST {path} HTTP/1.1\r\nhost: test\r\n{lines}".encode()


def signed_request(body: bytes, **extra: str) -> bytes:
    fields = {**signed(), "content-length": str(len(body)), **extra}
    return head(**fields) + b"\r\n" + body


def read_until_closed(conn: socket.socket, within_s: float) -> tuple[bytes, bool]:
    """Everything the server sends within ``within_s``, and whether it closed the connection."""
    received = b""
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def drip(conn: socket.socket, within_s: float, every_s: float = 0.1) -> tuple[bytes, bool]:
    """Send one header byte every ``every_s`` (a slow client) until the server answers or closes.

    Returns what the server sent and whether it cut the client off within ``within_s``.
    """
    received = b""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            conn.sendall(b"x")
        except OSError:
            return received, True
        data, closed = read_until_closed(conn, every_s)
        received += data
        if closed:
            return received, True
    return received, False


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


# --- head size ------------------------------------------------------------------------------


async def test_head_over_the_limit_is_431_and_the_connection_closed(
    fresh_database_url: str,
) -> None:
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        # A head that never ends: the server must decide before its end.
        conn.sendall(head(**{"x-padding": "a" * (HEADER_LIMIT + 1024)}))
        response, closed = read_until_closed(conn, MARGIN_S)
    assert status_of(response) == 431, response[:200]
    assert closed


async def test_signed_request_with_an_oversized_header_is_431_and_not_stored(
    fresh_database_url: str,
) -> None:
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        conn.sendall(signed_request(encode(taobao_status()), **{"x-padding": "a" * HEADER_LIMIT}))
        response, closed = read_until_closed(conn, MARGIN_S)
    assert status_of(response) == 431, response[:200]
    assert closed
    assert await count(fresh_database_url, "webhook_inbox") == 0


async def test_endless_head_is_cut_off_not_buffered(fresh_database_url: str) -> None:
    """50 MB heads took the process to ~1 GB: the server must stop reading long before."""
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        conn.sendall(head() + b"x-padding: ")
        sent, cut_off = 0, False
        while sent < 16 * 1024 * 1024:
            try:
                conn.sendall(b"a" * 65536)
            except OSError:
                cut_off = True
                break
            sent += 65536
    # Socket buffers on both sides hold a few MiB at most: the rest was refused.
    assert cut_off, f"{sent} bytes of one header accepted"


async def test_endless_trailer_is_cut_off(fresh_database_url: str) -> None:
    """Trailers of a chunked body are header fields too: they share the head's budget."""
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        fields = {**signed(), "transfer-encoding": "chunked"}
        conn.sendall(head(**fields) + b"\r\n" + b"2\r\n{}\r\n0\r\nx-trailer: ")
        sent, cut_off = 0, False
        while sent < 16 * 1024 * 1024:
            try:
                conn.sendall(b"a" * 65536)
            except OSError:
                cut_off = True
                break
            sent += 65536
    assert cut_off, f"{sent} bytes of one trailer accepted"


async def test_ordinary_request_sent_in_pieces_is_served(fresh_database_url: str) -> None:
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        request = signed_request(encode(taobao_status()), connection="close")
        for start in range(0, len(request), 40):
            conn.sendall(request[start : start + 40])
        response, closed = read_until_closed(conn, MARGIN_S)
    assert status_of(response) == 200, response[:200]
    assert closed
    assert await count(fresh_database_url, "webhook_inbox") == 1


# --- read timeouts --------------------------------------------------------------------------


async def test_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    fresh_database_url: str,
) -> None:
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        response, closed = read_until_closed(conn, HEADER_TIMEOUT_S + MARGIN_S)
    assert closed
    assert response == b""


async def test_slow_head_is_408_and_closed_after_the_header_timeout(
    fresh_database_url: str,
) -> None:
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        conn.sendall(head() + b"x-slow: ")
        started = time.monotonic()
        response, closed = drip(conn, HEADER_TIMEOUT_S + MARGIN_S)
        elapsed = time.monotonic() - started
    assert closed, "a client sending a byte every 0.1 s was never cut off"
    assert status_of(response) == 408, response[:200]
    assert elapsed < HEADER_TIMEOUT_S + MARGIN_S


async def test_slow_body_is_408_and_closed_after_the_body_timeout(
    fresh_database_url: str,
) -> None:
    body = encode(taobao_status())
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        request = signed_request(body)
        conn.sendall(request[: len(request) - len(body) // 2])  # half of the body, then nothing
        response, closed = read_until_closed(conn, BODY_TIMEOUT_S + MARGIN_S)
    assert status_of(response) == 408, response[:200]
    assert b'"body_timeout"' in response
    assert closed
    assert await count(fresh_database_url, "webhook_inbox") == 0


async def test_body_still_dripping_after_an_answer_is_cut_off(fresh_database_url: str) -> None:
    """An early answer (413 on the declared length) does not keep the connection open for the
    rest of the body: a client still sending it slowly is cut off at the body timeout."""
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        fields = {**signed(), "content-length": str(10 * 1024 * 1024)}
        conn.sendall(head(**fields) + b"\r\n{")
        response, cut_off = drip(conn, BODY_TIMEOUT_S + 1.0 + MARGIN_S)
    assert status_of(response) == 413, response[:200]
    assert cut_off, "a body dripping after the answer kept its connection"


# --- connections ----------------------------------------------------------------------------


async def test_requests_beyond_the_connection_limit_get_503(fresh_database_url: str) -> None:
    settings = limited_settings(fresh_database_url, max_connections=3, header_timeout_s=5.0)
    with web_role(settings) as address:
        idle = [connect(address) for _ in range(3)]
        try:
            for conn in idle:
                conn.sendall(head())  # an unfinished head holds its connection
            await asyncio.sleep(0.2)
            with connect(address) as conn:
                conn.sendall(HEALTHZ_AND_CLOSE)
                refused, _ = read_until_closed(conn, MARGIN_S)
        finally:
            for conn in idle:
                conn.close()
        await asyncio.sleep(0.2)
        with connect(address) as conn:
            conn.sendall(HEALTHZ_AND_CLOSE)
            served, _ = read_until_closed(conn, MARGIN_S)
    assert status_of(refused) == 503, refused[:200]
    assert status_of(served) == 200, served[:200]


async def test_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    fresh_database_url: str,
) -> None:
    with web_role(limited_settings(fresh_database_url)) as address, connect(address) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        started = time.monotonic()
        response, closed = read_until_closed(conn, KEEP_ALIVE_S + MARGIN_S)
        elapsed = time.monotonic() - started
    assert status_of(response) == 200, response[:200]
    assert closed
    assert elapsed >= KEEP_ALIVE_S * 0.8
