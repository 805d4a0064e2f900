"""When each queue was last seen consumed: stamps the worker watchdog writes and `proj status --check` reads.

A worker stamps a queue it consumes whenever its check finds the queue accounted for: empty, or this
worker took a message since its last check, or all its slots were taken. A queue whose oldest message
has waited longer than the window and that no worker stamped within it is stalled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from proj.stores.queues import QueueStat, queue_stats

KEY_PREFIX = "proj:consumed:"
# Stamps outlive a few windows, so a long-stalled queue still shows when it was last consumed.
TTL_WINDOWS = 4


def stamp_key(queue: str) -> str:
    """The key holding the time `queue` was last seen consumed."""
    return f"{KEY_PREFIX}{queue}"


@dataclass(frozen=True)
class Stall:
    """A queue with messages waiting that nothing consumed within the window."""

    queue: QueueStat
    last_consumed: float | None  # epoch seconds; None: never, or longer ago than the stamps live

    def describe(self, now: float, window: float) -> str:
        """One line: the queue, what waits, since when, and when it was last consumed."""
        age = self.queue.oldest_age
        oldest = "oldest of unknown age" if age is None else f"oldest sent {age:.0f} s ago"
        last = (
            f"not consumed in the last {window * TTL_WINDOWS:g} s"
            if self.last_consumed is None
            else f"last consumed {now - self.last_consumed:.0f} s ago"
        )
        return f"{self.queue.name}: {self.queue.depth} waiting, {oldest}; {last}"


class ConsumptionStamps:
    """`proj:consumed:<queue>`: the epoch time a worker last saw the queue consumed, expiring."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.client = client

    def stamp(self, queues: list[str], window: float, now: float | None = None) -> None:
        """Record that `queues` were consumed at `now`; the stamps vanish after TTL_WINDOWS windows."""
        if not queues:
            return
        now = time.time() if now is None else now
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.set(stamp_key(queue), repr(now), px=max(1, int(window * TTL_WINDOWS * 1000)))
            pipe.execute()

    def last(self, queues: list[str]) -> dict[str, float | None]:
        """The last stamp of each queue, None where there is none."""
        if not queues:
            return {}
        values = self.client.mget([stamp_key(queue) for queue in queues])
        return {queue: None if raw is None else float(raw) for queue, raw in zip(queues, values, strict=True)}


def stalled_queues(
    client: redis.Redis[bytes], names: list[str], window: float, now: float | None = None
) -> list[Stall]:
    """Queues with a message waiting longer than `window` (or of unknown age) and no stamp within it."""
    now = time.time() if now is None else now
    stamps = ConsumptionStamps(client).last(names)
    stalls = []
    for stat in queue_stats(client, names, now):
        if stat.depth == 0 or (stat.oldest_age is not None and stat.oldest_age <= window):
            continue
        last = stamps[stat.name]
        if last is None or now - last > window:
            stalls.append(Stall(stat, last))
    return stalls
