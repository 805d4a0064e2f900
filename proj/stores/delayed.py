"""Delayed messages held in a Redis sorted set and moved onto their queue when due, atomically.

Why: on Redis a message with a far ETA sits in a worker's memory and comes back every visibility
timeout (celery-landscape 2.1), so long retry delays would force BROKER_VISIBILITY_TIMEOUT up and
with it the time a killed worker's tasks wait. Instead a delay longer than BROKER_MAX_COUNTDOWN is
stored here, already serialised exactly as the broker would hold it, scored by its due time; every
worker runs `release_due` each second, and one Lua script removes a due message from the set and
pushes it onto its queue list in the same step, so it is neither lost nor released twice.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis

DELAYED_KEY = "proj:delayed"
RELEASE_BATCH = 500

_RELEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    local item = cjson.decode(member)
    redis.call('LPUSH', item.q, item.m)
    moved = moved + 1
  end
end
return moved
"""
# How many members wait for each queue list, counted inside Redis by the member's leading "q" (the
# payloads stay there): one pass over the set. Returns queue, count, queue, count, ...
_COUNT_BY_QUEUE = """
local counts, order = {}, {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local queue = string.match(member, '^{"q": "([^"]*)"') or ''
  if not counts[queue] then counts[queue] = 0; table.insert(order, queue) end
  counts[queue] = counts[queue] + 1
end
local flat = {}
for _, queue in ipairs(order) do table.insert(flat, queue); table.insert(flat, counts[queue]) end
return flat
"""


def eta_epoch(eta: str) -> float:
    """Seconds since the epoch of an ISO 8601 ETA header (naive means UTC, as Celery writes it)."""
    when = datetime.fromisoformat(eta)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


class DelayedSet:
    """The sorted set of parked broker messages: member {"q": queue list key, "m": payload}."""

    def __init__(self, client: redis.Redis[bytes], key: str = DELAYED_KEY) -> None:
        self.client = client
        self.key = key
        self._release = client.register_script(_RELEASE)
        self._count_by_queue = client.register_script(_COUNT_BY_QUEUE)

    def add(self, queue_key: str, payload: str, due: float) -> None:
        """Park `payload` (a serialised broker message) for the list `queue_key` until `due` (epoch s)."""
        self.client.zadd(self.key, {json.dumps({"q": queue_key, "m": payload}): due})

    def release_due(self, now: float | None = None, limit: int = RELEASE_BATCH) -> int:
        """Move every message due by `now` onto its queue; return how many moved."""
        when = time.time() if now is None else now
        return int(self._release([self.key], [when, limit]))

    def count_by_queue(self) -> dict[str, int]:
        """How many parked messages wait for each queue list (lists with none are left out)."""
        flat = self._count_by_queue([self.key])
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def pending(self) -> list[dict[str, Any]]:
        """What waits, soonest first: queue, due time and the parsed message headers."""
        items = []
        for member, score in self.client.zrange(self.key, 0, -1, withscores=True):
            item = json.loads(member)
            headers = json.loads(item["m"]).get("headers", {})
            items.append(
                {
                    "queue": item["q"],
                    "due": score,
                    "task": headers.get("task"),
                    "id": headers.get("id"),
                    "retries": headers.get("retries"),
                }
            )
        return items
