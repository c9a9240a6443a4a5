"""Callback delivery, as PandaPon does it, plus the ways real delivery goes wrong.

Each message is POSTed as JSON with the five signed request headers (fresh timestamp and nonce
per attempt), or signed another way when ``signing`` says so (``callback_headers``): nothing
public says how PandaPon signs its callbacks (docs/upstream.md#callback-authentication).
Anything but HTTP 200 within ``timeout_s`` is a failure, retried after ``retry_interval_s`` up
to ``max_retries`` times (PandaPon: every 30 min, 5 times; compressed here). On top of that,
each message may be dropped, duplicated, delayed or held back until the next one has gone
(reordered), with seeded probabilities, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from service.config import TimestampUnit
from service.pandapon.signer import (
    DEFAULT_SIGNER,
    HEADER_TIMESTAMP,
    Credentials,
    Signer,
    signed_headers,
    timestamp_now,
)
from service.sandbox.settings import DeliverySettings

log = structlog.get_logger(__name__)

LOG_SIZE = 10_000
HEADER_AUTHORIZATION = "authorization"


def other_secret(secret: str) -> str:
    """A secret that is never ours: the ``other_secret`` variant signs with it."""
    return f"other-{secret}"


def hmac_authorization(access_key: str, secret: str, body: bytes) -> str:
    """[TG] style: base64 of HMAC-SHA256 over access key + body, keyed by the secret."""
    digest = hmac.new(secret.encode(), access_key.encode() + body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def callback_headers(
    settings: DeliverySettings,
    credentials: Credentials,
    body: bytes,
    *,
    unit: TimestampUnit,
    signer: Signer = DEFAULT_SIGNER,
    now: float | None = None,
) -> dict[str, str]:
    """The auth headers of one attempt as ``settings.signing`` says (content-type not included).

    ``unit`` is the upstream side's unit, used unless ``settings.timestamp_unit`` is set;
    ``settings.timestamp_skew_s`` moves the stamped time (negative: in the past).
    """
    if settings.signing == "none":
        return {}
    unit = settings.timestamp_unit or unit
    moment = (time.time() if now is None else now) + settings.timestamp_skew_s
    if settings.signing == "hmac_sha256":
        return {
            HEADER_AUTHORIZATION: hmac_authorization(
                credentials.access_key, credentials.access_secret, body
            ),
            HEADER_TIMESTAMP: timestamp_now(unit, moment),
        }
    if settings.signing == "other_secret":
        credentials = Credentials(
            access_key=credentials.access_key,
            access_secret=other_secret(credentials.access_secret),
            user_id=credentials.user_id,
        )
    return signed_headers(credentials, unit=unit, signer=signer, now=moment)


@dataclass
class DeliveryRecord:
    id: int
    account: str  # the user-id of the account whose change it tells
    message_type: str
    platform: str
    order_id: str
    body: bytes
    duplicate_of: int | None = None
    state: str = "pending"  # pending | delivered | failed | dropped | no_target
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delayed: bool = False
    held: bool = False

    def as_json(self, *, with_body: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "account": self.account,
            "message_type": self.message_type,
            "platform": self.platform,
            "order_id": self.order_id,
            "duplicate_of": self.duplicate_of,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "delayed": self.delayed,
            "held": self.held,
        }
        if with_body:
            data["message"] = json.loads(self.body)
        return data


class CallbackDeliverer:
    """Sends callbacks in the background; owns its own HTTP client (``start``/``aclose``)."""

    def __init__(
        self,
        settings: DeliverySettings,
        credentials: Credentials,
        *,
        unit: TimestampUnit = "ms",
        signer: Signer = DEFAULT_SIGNER,
        seed: int | str = 0,
        record_ids: Iterator[int] | None = None,
    ) -> None:
        self.settings = settings
        self._credentials = credentials
        self.upstream_unit = unit  # the upstream side's unit: callbacks use it unless told
        self._signer = signer
        self._rng = random.Random(f"{seed}:delivery")
        # Shared by the deliverers of one sandbox, so a record id names one message of any account.
        self._ids = record_ids or itertools.count(1)
        self._records: deque[DeliveryRecord] = deque(maxlen=LOG_SIZE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: DeliveryRecord | None = None
        self._held_timer: asyncio.TimerHandle | None = None
        self._http: httpx.AsyncClient | None = None
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._states: Counter[str] = Counter()
        self._closed = False

    async def start(self) -> None:
        self._http = httpx.AsyncClient(headers={"user-agent": "PandaPon-sandbox"}, trust_env=False)

    async def aclose(self) -> None:
        self._closed = True
        if self._held_timer is not None:
            self._held_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    def configure(self, settings: DeliverySettings) -> None:
        if settings.concurrency != self.settings.concurrency:
            self._semaphore = asyncio.Semaphore(settings.concurrency)
        self.settings = settings

    # --- submitting -------------------------------------------------------------------------

    def submit(self, message: dict[str, Any], platform: str, order_id: str) -> DeliveryRecord:
        """Queue one message; the fate of each copy is drawn now, in submission order."""
        body = json.dumps(message, ensure_ascii=False).encode()
        record = self._record(message["messageType"], platform, order_id, body)
        settings = self.settings
        if not settings.webhook_url:
            self._set_state(record, "no_target")
            return record
        if self._rng.random() < settings.drop:
            self._set_state(record, "dropped")
            return record
        copies = [record]
        if self._rng.random() < settings.duplicate:
            copies.append(
                self._record(record.message_type, platform, order_id, body, duplicate_of=record.id)
            )
        for copy in copies:
            delayed = self._rng.random() < settings.delay
            held = self._rng.random() < settings.reorder
            copy.delayed = delayed
            if held and self._held is None:
                copy.held = True
                self._held = copy
                loop = asyncio.get_running_loop()
                self._held_timer = loop.call_later(settings.reorder_hold_s, self._release_held)
                continue
            follower = self._take_held()
            self._spawn(copy, settings.delay_s if delayed else 0.0, follower)
        return record

    def _record(
        self,
        message_type: str,
        platform: str,
        order_id: str,
        body: bytes,
        *,
        duplicate_of: int | None = None,
    ) -> DeliveryRecord:
        record = DeliveryRecord(
            id=next(self._ids),
            account=self._credentials.user_id,
            message_type=message_type,
            platform=platform,
            order_id=order_id,
            body=body,
            duplicate_of=duplicate_of,
        )
        self._records.append(record)
        self._states["pending"] += 1
        return record

    def _set_state(self, record: DeliveryRecord, state: str) -> None:
        self._states[record.state] -= 1
        self._states[state] += 1
        record.state = state

    def _take_held(self) -> DeliveryRecord | None:
        held, self._held = self._held, None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        return held

    def _release_held(self) -> None:
        self._held_timer = None
        held, self._held = self._held, None
        if held is not None:
            self._spawn(held, 0.0, None)

    def _spawn(self, record: DeliveryRecord, delay: float, follower: DeliveryRecord | None) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(record, delay, follower))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- sending ----------------------------------------------------------------------------

    async def _deliver(
        self, record: DeliveryRecord, delay: float, follower: DeliveryRecord | None
    ) -> None:
        if delay:
            await asyncio.sleep(delay)
        try:
            while True:
                delivered = await self._attempt(record)
                if follower is not None:  # a held message goes once this one has been tried
                    self._spawn(follower, 0.0, None)
                    follower = None
                if delivered:
                    self._set_state(record, "delivered")
                    return
                if record.attempts > self.settings.max_retries:
                    self._set_state(record, "failed")
                    log.info("callback given up", id=record.id, attempts=record.attempts)
                    return
                await asyncio.sleep(self.settings.retry_interval_s)
        finally:
            if follower is not None:
                self._spawn(follower, 0.0, None)

    async def _attempt(self, record: DeliveryRecord) -> bool:
        url = self.settings.webhook_url
        if self._http is None or not url:
            record.attempts += 1
            record.last_error = "no webhook_url"
            return False
        async with self._semaphore:
            record.attempts += 1
            headers = callback_headers(
                self.settings,
                self._credentials,
                record.body,
                unit=self.upstream_unit,
                signer=self._signer,
            )
            headers["content-type"] = "application/json"
            try:
                response = await self._http.post(
                    url, content=record.body, headers=headers, timeout=self.settings.timeout_s
                )
            except httpx.HTTPError as error:
                record.last_status = None
                record.last_error = type(error).__name__
                return False
        record.last_status = response.status_code
        record.last_error = None if response.status_code == 200 else response.reason_phrase
        return response.status_code == 200

    # --- observing --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._states["pending"]

    async def drain(self, within_s: float) -> bool:
        """Send any held message now and wait for every delivery to finish (or ``within_s``)."""
        held = self._take_held()
        if held is not None:
            self._spawn(held, 0.0, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "states": {k: v for k, v in self._states.items() if v},
            "pending": self.pending,
            "in_flight": len(self._tasks),
            "held": self._held.id if self._held else None,
        }

    def records(self, *, with_body: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        recent = list(self._records)[-limit:]
        return [r.as_json(with_body=with_body) for r in recent]
