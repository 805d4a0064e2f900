"""Set-aside messages: what workers took from a queue but could not run, kept for a person to look at."""

from __future__ import annotations

from typing import Any

import redis

# The list proj's transport already moved unreadable items to; every other kind of set-aside
# message (unknown task, refused content type, undecodable body) joins it, as it was on the queue.
KEY = "proj:unreadable"
# Newest first and at most this many: a producer flooding a queue with junk must not fill Redis.
MAX_KEPT = 10_000


def keep(pipe: Any, raw: bytes) -> Any:
    """Queue the commands that keep `raw` on `pipe` (a redis-py pipeline), so callers stay atomic."""
    return pipe.lpush(KEY, raw).ltrim(KEY, 0, MAX_KEPT - 1)


class SetAsideStore:
    """The list of set-aside messages, each the raw bytes the queue held."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self._redis = client

    def add(self, raw: bytes) -> None:
        """Keep one message (the oldest beyond MAX_KEPT are dropped)."""
        with self._redis.pipeline(transaction=True) as pipe:
            keep(pipe, raw).execute()

    def count(self) -> int:
        return int(self._redis.llen(KEY))

    def list(self, limit: int = 100) -> list[bytes]:
        """The most recently set-aside messages first."""
        return list(self._redis.lrange(KEY, 0, limit - 1))
