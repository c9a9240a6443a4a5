"""One process of the shared-rate-limit test: take N tokens from the Redis bucket, print when.

    python -m tests.support.ratelimit_probe REDIS_URL KEY RATE BURST N

It announces itself on ``KEY:ready`` and waits for a go on ``KEY:go`` (so every process starts
together, however long its imports took), then prints a JSON list of the wall-clock times at
which each token was granted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import redis.asyncio as aioredis

from service.pandapon.ratelimit import RedisTokenBucket


async def main(url: str, key: str, rate: float, burst: float, count: int) -> None:
    control = aioredis.Redis.from_url(url)
    limiter = RedisTokenBucket(url, rate, burst, key=key)
    try:
        await control.rpush(f"{key}:ready", 1)
        await control.blpop([f"{key}:go"], timeout=30)
        granted = []
        for _ in range(count):
            await limiter.acquire()
            granted.append(time.time())
        print(json.dumps(granted))
    finally:
        await limiter.aclose()
        await control.aclose()


if __name__ == "__main__":
    url, key, rate, burst, count = sys.argv[1:6]
    asyncio.run(main(url, key, float(rate), float(burst), int(count)))
