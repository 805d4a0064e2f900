"""The dead-letter store: tasks that failed for good, kept in Redis for inspection and replay."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis

from proj.credentials import scrub
from proj.settings import get_settings

INDEX_KEY = "proj:dlq:index"
ENTRIES_KEY = "proj:dlq:entries"
# Replayed letters move here (same limits): out of the list and the counts, still found by id.
REPLAYED_INDEX_KEY = "proj:dlq:replayed:index"
REPLAYED_ENTRIES_KEY = "proj:dlq:replayed:entries"
# The message header of a replay: the id of the dead letter it replays (kept across retries).
REPLAY_OF_HEADER = "proj_replay_of"
# Ids read per round trip while a filtered list looks for its matches.
_LIST_CHUNK = 500
# Drops, in one atomic step, the letters that failed before ARGV[1] and then the oldest ones past
# ARGV[2]; both keys expire ARGV[3] s after the last write, when every letter in them has expired anyway.
# KEYS: index, entries. Returns how many letters went.
_TRIM = """
local function drop(ids)
  for i = 1, #ids, 500 do
    local chunk = {unpack(ids, i, math.min(i + 499, #ids))}
    redis.call('HDEL', KEYS[2], unpack(chunk))
    redis.call('ZREM', KEYS[1], unpack(chunk))
  end
  return #ids
end
local dropped = drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1]))
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if excess > 0 then dropped = dropped + drop(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) end
if tonumber(ARGV[3]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return dropped
"""


@dataclass(frozen=True)
class DeadLetter:
    """One failed task with everything needed to understand and replay it."""

    task_id: str
    task_name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    failed_at: float = field(default_factory=time.time)
    retries: int = 0
    replay_of: str | None = None  # the dead letter this task was a replay of
    replayed_as: str | None = None  # the task id it was replayed as (`proj dlq replay`)

    def to_json(self) -> str:
        """Serialise; arguments that JSON cannot carry are stored as their repr."""
        return json.dumps(asdict(self), default=repr)

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeadLetter:
        return cls(**json.loads(raw))


class DeadLetterStore:
    """Dead letters in two Redis keys: a hash of entries and an index ordered by failure time.

    They hold message bodies, so they do not stay: older than `max_age` seconds they are dropped, and
    past `max_count` the oldest go (defaults DLQ_MAX_AGE and DLQ_MAX_COUNT).
    """

    def __init__(
        self, client: redis.Redis[bytes], max_age: int | None = None, max_count: int | None = None
    ) -> None:
        settings = get_settings()
        self.max_age = settings.dlq_max_age if max_age is None else max_age
        self.max_count = settings.dlq_max_count if max_count is None else max_count
        if self.max_age < 1 or self.max_count < 1:
            raise ValueError(
                f"DLQ_MAX_AGE and DLQ_MAX_COUNT must be 1 or more, got {self.max_age}, {self.max_count}"
            )
        self._redis = client
        self._trim = client.register_script(_TRIM)

    def record(self, letter: DeadLetter) -> None:
        """Store (or overwrite) the dead letter of one task id, without secrets; drop what has expired."""
        # A traceback can quote a URL with its password, or a password itself (proj.credentials).
        letter = replace(letter, message=scrub(letter.message), traceback=scrub(letter.traceback))
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(ENTRIES_KEY, letter.task_id, letter.to_json())
            pipe.zadd(INDEX_KEY, {letter.task_id: letter.failed_at})
            pipe.execute()
        self.expire(ttl=self.max_age)

    def expire(self, ttl: int = 0) -> int:
        """Drop the letters older than max_age, then the oldest past max_count; return how many went."""
        cutoff = time.time() - self.max_age
        return int(self._trim(keys=[INDEX_KEY, ENTRIES_KEY], args=[repr(cutoff), self.max_count, ttl]))

    def list(
        self, limit: int = 100, since: float = 0.0, where: Callable[[DeadLetter], bool] | None = None
    ) -> list[DeadLetter]:
        """The most recent dead letters first, failed at `since` or later and matching `where`."""
        self.expire()
        found: list[DeadLetter] = []
        start = 0
        while len(found) < limit:
            ids = self._redis.zrevrangebyscore(INDEX_KEY, "+inf", since, start=start, num=_LIST_CHUNK)
            if not ids:
                break
            start += len(ids)
            letters = [DeadLetter.from_json(raw) for raw in self._redis.hmget(ENTRIES_KEY, ids) if raw]
            found += [letter for letter in letters if where is None or where(letter)]
        return found[:limit]

    def count(self) -> int:
        """How many dead letters have not expired (a read: nothing is dropped)."""
        return int(self._redis.zcount(INDEX_KEY, time.time() - self.max_age, "+inf"))

    def mark_replayed(self, letter: DeadLetter, new_id: str) -> DeadLetter:
        """Move a letter out of the list, with the id it was replayed as; it stays found by id."""
        replayed = replace(letter, replayed_as=new_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(ENTRIES_KEY, letter.task_id)
            pipe.zrem(INDEX_KEY, letter.task_id)
            pipe.hset(REPLAYED_ENTRIES_KEY, letter.task_id, replayed.to_json())
            pipe.zadd(REPLAYED_INDEX_KEY, {letter.task_id: letter.failed_at})
            pipe.execute()
        cutoff = time.time() - self.max_age
        self._trim(
            keys=[REPLAYED_INDEX_KEY, REPLAYED_ENTRIES_KEY], args=[repr(cutoff), self.max_count, self.max_age]
        )
        return replayed

    def get(self, task_id: str) -> DeadLetter | None:
        """One dead letter, replayed ones too, by task id (a unique prefix is enough), or None."""
        raw = self._redis.hget(ENTRIES_KEY, task_id) or self._redis.hget(REPLAYED_ENTRIES_KEY, task_id)
        if raw is None:
            matches = [
                (key, tid)
                for key in (ENTRIES_KEY, REPLAYED_ENTRIES_KEY)
                for tid in self._redis.hkeys(key)
                if tid.decode().startswith(task_id)
            ]
            raw = self._redis.hget(*matches[0]) if len(matches) == 1 else None
        letter = None if raw is None else DeadLetter.from_json(raw)
        return letter if letter is not None and letter.failed_at >= time.time() - self.max_age else None

    def remove(self, task_id: str) -> bool:
        """Forget one dead letter; True if it existed."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(ENTRIES_KEY, task_id)
            pipe.zrem(INDEX_KEY, task_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def purge(self) -> int:
        """Forget every dead letter, replayed ones too, and return how many were not replayed."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zcard(INDEX_KEY)
            pipe.delete(ENTRIES_KEY, INDEX_KEY, REPLAYED_ENTRIES_KEY, REPLAYED_INDEX_KEY)
            count, _ = pipe.execute()
        return int(count)
