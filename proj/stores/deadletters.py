"""The dead-letter store: tasks that failed for good, kept in Redis for inspection and replay."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

INDEX_KEY = "proj:dlq:index"
ENTRIES_KEY = "proj:dlq:entries"


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

    def to_json(self) -> str:
        """Serialise; arguments that JSON cannot carry are stored as their repr."""
        return json.dumps(asdict(self), default=repr)

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeadLetter:
        return cls(**json.loads(raw))


class DeadLetterStore:
    """Dead letters in two Redis keys: a hash of entries and an index ordered by failure time."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self._redis = client

    def record(self, letter: DeadLetter) -> None:
        """Store (or overwrite) the dead letter of one task id."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(ENTRIES_KEY, letter.task_id, letter.to_json())
            pipe.zadd(INDEX_KEY, {letter.task_id: letter.failed_at})
            pipe.execute()

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters first."""
        ids = self._redis.zrevrange(INDEX_KEY, 0, limit - 1)
        if not ids:
            return []
        raws = self._redis.hmget(ENTRIES_KEY, ids)
        return [DeadLetter.from_json(raw) for raw in raws if raw is not None]

    def count(self) -> int:
        return int(self._redis.zcard(INDEX_KEY))

    def get(self, task_id: str) -> DeadLetter | None:
        """One dead letter by task id (a unique prefix is enough), or None."""
        raw = self._redis.hget(ENTRIES_KEY, task_id)
        if raw is None:
            matches = [tid for tid in self._redis.hkeys(ENTRIES_KEY) if tid.decode().startswith(task_id)]
            raw = self._redis.hget(ENTRIES_KEY, matches[0]) if len(matches) == 1 else None
        return None if raw is None else DeadLetter.from_json(raw)

    def remove(self, task_id: str) -> bool:
        """Forget one dead letter; True if it existed."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(ENTRIES_KEY, task_id)
            pipe.zrem(INDEX_KEY, task_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def purge(self) -> int:
        """Forget every dead letter and return how many there were."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zcard(INDEX_KEY)
            pipe.delete(ENTRIES_KEY, INDEX_KEY)
            count, _ = pipe.execute()
        return int(count)
