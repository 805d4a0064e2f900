"""The last canary probe of each queue: whether a worker answered, and the round trip it took."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis

KEY = "proj:canary"  # hash: queue -> the last probe of that queue, as JSON


@dataclass(frozen=True)
class CanaryProbe:
    """One canary sent to a queue and waited for."""

    queue: str
    ok: bool
    at: float  # when the probe ended, seconds since the epoch
    seconds: float | None = None  # round trip from send to answer; None when no answer came
    error: str = ""
    worker: str = ""  # the worker that answered


class CanaryRecords:
    """The last probe of every queue, kept in one Redis hash (overwritten by the next probe)."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self._redis = client

    def record(self, probe: CanaryProbe) -> None:
        """Keep `probe` as the last one of its queue."""
        self._redis.hset(KEY, probe.queue, json.dumps(asdict(probe)))

    def last(self) -> list[CanaryProbe]:
        """The last probe of each queue ever probed, by queue name."""
        raws = self._redis.hgetall(KEY)
        return sorted((CanaryProbe(**json.loads(raw)) for raw in raws.values()), key=lambda p: p.queue)
