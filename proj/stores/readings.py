"""The figures an operator watches, read from Redis at once: one source for `proj status` and /metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from proj.stores.canary import CanaryProbe, CanaryRecords
from proj.stores.deadletters import ENTRIES_KEY, DeadLetterStore
from proj.stores.delayed import DelayedSet
from proj.stores.inflight import REGISTRY_KEY
from proj.stores.queues import UNACKED_KEY, QueueStat, queue_stats
from proj.stores.setaside import SetAsideStore


@dataclass(frozen=True)
class QueueReading:
    """One queue: what waits, how long the oldest has waited, what is taken and what is parked."""

    name: str
    depth: int
    oldest_age: float | None  # None when nothing waits or the oldest message carries no send time
    # Both None when the broker is not Redis (RabbitMQ keeps them itself).
    unacked: int | None  # taken by a consumer, not yet acknowledged
    parked: int | None  # delayed past BROKER_MAX_COUNTDOWN, waiting in proj's delayed set


@dataclass(frozen=True)
class DeadLetterCount:
    """How many dead letters one task left with one kind of error."""

    task: str
    error: str
    count: int


@dataclass(frozen=True)
class Readings:
    """Everything `proj status` prints and /metrics exports, read in one go."""

    queues: list[QueueReading]
    dead_letters: list[DeadLetterCount]
    set_aside: int
    canaries: list[CanaryProbe]

    @property
    def unacked(self) -> int:
        return sum(q.unacked or 0 for q in self.queues)

    @property
    def dead_letter_total(self) -> int:
        return sum(d.count for d in self.dead_letters)


def read(
    client: redis.Redis[bytes],
    names: list[str],
    depths: list[QueueStat] | None = None,
    now: float | None = None,
) -> Readings:
    """Read every figure for the queues `names`; `depths` when the broker is not Redis (RabbitMQ)."""
    now = time.time() if now is None else now
    if depths is None:
        unacked, parked = unacked_by_queue(client), DelayedSet(client).count_by_queue()
        queues = [
            QueueReading(s.name, s.depth, s.oldest_age, unacked.get(s.name, 0), parked.get(s.name, 0))
            for s in queue_stats(client, names, now)
        ]
    else:
        queues = [QueueReading(s.name, s.depth, s.oldest_age, None, None) for s in depths]
    letters = [
        DeadLetterCount(task, error, count)
        for (task, error), count in sorted(dead_letters_by_task_and_error(client).items())
    ]
    return Readings(queues, letters, SetAsideStore(client).count(), CanaryRecords(client).last())


def unacked_by_queue(client: redis.Redis[bytes]) -> dict[str, int]:
    """Messages taken and not acknowledged, by queue: proj's inflight lists and kombu's unacked hash."""
    counts: dict[str, int] = {}
    lists = {name.decode(): queue.decode() for name, queue in client.hgetall(REGISTRY_KEY).items()}
    with client.pipeline(transaction=False) as pipe:
        for name in lists:
            pipe.llen(name)
        lengths = pipe.execute()
    for queue, length in zip(lists.values(), lengths, strict=True):
        counts[queue] = counts.get(queue, 0) + int(length)
    # kombu's record of a message taken with BRPOP: [payload, exchange, routing key]; proj routes
    # each queue by its own name (celeryconfig.task_queues).
    for raw in client.hvals(UNACKED_KEY):
        queue = json.loads(raw)[2]
        counts[queue] = counts.get(queue, 0) + 1
    return counts


def dead_letters_by_task_and_error(client: redis.Redis[bytes]) -> dict[tuple[str, str], int]:
    """How many dead letters have not expired, by task name and exception type (a read)."""
    cutoff = time.time() - DeadLetterStore(client).max_age
    counts: dict[tuple[str, str], int] = {}
    for raw in client.hvals(ENTRIES_KEY):
        letter = json.loads(raw)
        if letter["failed_at"] >= cutoff:
            key = (letter["task_name"], letter["exc_type"])
            counts[key] = counts.get(key, 0) + 1
    return counts
