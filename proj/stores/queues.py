"""What waits in each queue list: depth and the age of the oldest message, read straight from Redis."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

SENT_AT_HEADER = "proj_sent_at"  # stamped on every publish (proj.integration.signals)
UNACKED_KEY = "unacked"  # kombu's hash of delivered, not yet acknowledged messages (BRPOP consumers)


@dataclass(frozen=True)
class QueueStat:
    """What is waiting in one queue."""

    name: str
    depth: int
    oldest_age: float | None


def queue_stats(client: redis.Redis[bytes], names: list[str], now: float | None = None) -> list[QueueStat]:
    """Depth and oldest-message age of each queue (kombu pushes on the left, pops on the right)."""
    now = time.time() if now is None else now
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
            pipe.lindex(name, -1)
        replies = pipe.execute()
    stats = []
    for index, name in enumerate(names):
        depth, oldest = replies[2 * index], replies[2 * index + 1]
        stats.append(QueueStat(name, int(depth), _age(oldest, now)))
    return stats


def _age(raw: bytes | None, now: float) -> float | None:
    if raw is None:
        return None
    try:
        sent_at = json.loads(raw)["headers"][SENT_AT_HEADER]
    except (ValueError, KeyError, TypeError):
        return None  # published by something that does not stamp the time
    return max(0.0, now - float(sent_at))


def broker_queue_stats(connection: Any, names: list[str]) -> list[QueueStat]:
    """Depth of each queue as the broker counts it (a passive declare; RabbitMQ): no oldest age."""
    channel = connection.default_channel
    return [
        QueueStat(name, int(channel.queue_declare(name, passive=True).message_count), None) for name in names
    ]
