"""Throughput and latency of proj's Celery configuration against stock Celery defaults."""

from __future__ import annotations

import time

import redis

from bench import common

NOTES = """\
- `redis-py LPUSH+BRPOP floor`: one redis-py client pushes a message and pops it back on one
  connection: the cost of the two broker round trips every task needs, with no Celery at all.
"""


def broker_floor(redis_url: str, n: int) -> list[common.Row]:
    """(d) LPUSH+BRPOP pairs per second from one redis-py connection."""
    client = redis.Redis.from_url(redis_url)
    payload = b'{"task": "noop"}' * 8
    started = time.perf_counter()
    for _ in range(n):
        client.lpush("bench.floor", payload)
        client.brpop(["bench.floor"], timeout=1)
    elapsed = time.perf_counter() - started
    client.close()
    return [common.row("redis-py LPUSH+BRPOP floor", "pairs/s", n / elapsed, "1/s"),
            common.row("redis-py LPUSH+BRPOP floor", "round trip", elapsed / n * 1e6 / 2, "µs")]


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """Every throughput and latency scenario, once."""
    return broker_floor(redis_url, 2_000 if quick else 20_000)


if __name__ == "__main__":
    common.standalone("throughput", run)
