"""Messages a consumer has taken and not yet acknowledged, kept in Redis lists under a lease.

Why: kombu takes a message with BRPOP and then records it as unacked (ZADD + HSET) in a second
command. Until that record lands the message is only in the worker's memory, and the record is one
more write before every task starts. A consumer of a single queue list can instead take the message
with BLMOVE into an inflight list of its own: the message never leaves Redis, and nothing more is
written before the task runs. Its ack is an LREM from that list.

Each inflight list is registered with the queue it takes from and a lease, which the owning process
renews from a thread. When a process dies its leases run out, and any consumer's periodic sweep
moves what is left in those lists back onto their queues, atomically (one Lua script), so a killed
worker's tasks come back after the lease rather than after kombu's visibility timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

logger = logging.getLogger(__name__)

REGISTRY_KEY = "proj.stores.inflight"  # hash: inflight list -> the queue list it takes from
LEASES_KEY = "proj.stores.inflight.leases"  # sorted set: inflight list -> lease end (Redis clock, seconds)
SWEEP_LIMIT = 100  # expired lists handled per sweep
# Seconds before a renewal that failed (Redis away, or refusing writes for now) is tried again,
# rather than a third of the lease: a pause of writes must not outlast what is left of a lease.
RENEW_RETRY = 1.0

# The Redis clock, so that workers on machines with skewed clocks agree on when a lease ended.
_NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
# KEYS: registry, leases. ARGV: lease seconds, then (inflight, queue) pairs.
_HOLD = (
    _NOW
    + """
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[i])
end
"""
)
# KEYS: leases. ARGV: lease seconds, then inflight lists. Returns the lists whose lease was gone.
# allow-oom (Redis 7): a full Redis (noeviction) must not let the leases of live workers run out, or
# the sweep would hand their running tasks to other workers; renewing updates scores in place.
_RENEW = (
    "#!lua flags=allow-oom\n"
    + _NOW
    + """
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""
)
# Move every message of the given inflight lists back onto its queue (next to be taken) and forget
# the lists. KEYS: registry, leases. ARGV: 'expired' and a limit, or 'lists' and the list names.
_REQUEUE = (
    _NOW
    + """
local lists
if ARGV[1] == 'expired' then
  lists = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
else
  lists = {unpack(ARGV, 2)}
end
local moved = 0
for _, inflight in ipairs(lists) do
  local queue = redis.call('HGET', KEYS[1], inflight)
  if queue then
    while redis.call('LMOVE', inflight, queue, 'LEFT', 'RIGHT') do moved = moved + 1 end
    redis.call('HDEL', KEYS[1], inflight)
  end
  redis.call('ZREM', KEYS[2], inflight)
end
return moved
"""
)


class InflightLists:
    """The registry of inflight lists and their leases in one Redis database."""

    def __init__(self, client: redis.Redis[Any]) -> None:
        self.client = client
        self._hold = client.register_script(_HOLD)
        self._renew = client.register_script(_RENEW)
        self._requeue = client.register_script(_REQUEUE)

    def hold(self, lists: dict[str, str], lease: float) -> None:
        """Register inflight lists (name -> queue) under a lease of `lease` seconds."""
        pairs = [word for item in lists.items() for word in item]
        self._hold(keys=[REGISTRY_KEY, LEASES_KEY], args=[lease, *pairs])

    def renew(self, lists: list[str], lease: float) -> list[str]:
        """Extend the leases; the lists whose lease had already ended (and were swept) are returned."""
        lost = self._renew(keys=[LEASES_KEY], args=[lease, *lists])
        return [name.decode() if isinstance(name, bytes) else name for name in lost]

    def requeue_expired(self, limit: int = SWEEP_LIMIT) -> int:
        """Put the messages of lists whose lease ended back on their queues; how many moved."""
        return int(self._requeue(keys=[REGISTRY_KEY, LEASES_KEY], args=["expired", limit]))

    def requeue(self, lists: list[str]) -> int:
        """Put everything left in these lists back on their queues and forget the lists."""
        if not lists:
            return 0
        return int(self._requeue(keys=[REGISTRY_KEY, LEASES_KEY], args=["lists", *lists]))

    def count(self) -> int:
        """Messages in all registered inflight lists: taken by a consumer, not yet acknowledged."""
        names = list(self.client.hkeys(REGISTRY_KEY))
        if not names:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            return sum(int(n) for n in pipe.execute())


class LeaseKeeper:
    """Renews the leases of this process's inflight lists from a daemon thread (fork-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[InflightLists, str, float]] = {}
        self._pid = 0
        self._failing = False  # the last round of renewals failed (logged once)
        self._lost: set[str] = set()  # held lists whose lease was found gone, until their channel asks
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: no thread, no leases of the parent's, a lock nobody holds."""
        self._lock = threading.Lock()
        self._held = {}
        self._pid = 0
        self._failing = False
        self._lost = set()

    def hold(self, lists: InflightLists, inflight: str, queue: str, lease: float) -> None:
        """Register `inflight` now (the caller waits) and keep renewing its lease."""
        lists.hold({inflight: queue}, lease)
        with self._lock:
            self._held[inflight] = (lists, queue, lease)
            if self._pid != os.getpid():  # the first list of this process: start its thread
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="proj-inflight-leases", daemon=True).start()

    def drop(self, inflight: str) -> None:
        """Stop renewing `inflight` (its channel is closing)."""
        with self._lock:
            self._held.pop(inflight, None)

    def take_lost(self, names: Iterable[str]) -> list[str]:
        """Which of `names` were found without a lease since the last call (and forget them)."""
        if not self._lost:  # the common case, on every take: no lock
            return []
        with self._lock:
            found = [name for name in names if name in self._lost]
            self._lost.difference_update(found)
        return found

    def renew_all(self) -> bool:
        """Renew every held lease once; re-register any that ran out while this process lived.

        False if some renewal failed (Redis away, or refusing writes for now): try again soon.
        """
        with self._lock:
            held = list(self._held.items())
        failure = ""
        for inflight, (lists, queue, lease) in held:
            try:
                if lists.renew([inflight], lease):
                    self._hold_again(lists, inflight, queue, lease)
            except redis.RedisError as exc:
                failure = failure or f"{inflight}: {exc}"
        if failure and not self._failing:  # once per streak: it is retried every RENEW_RETRY
            logger.warning("Could not renew the lease of %s; trying again every %gs", failure, RENEW_RETRY)
        elif self._failing and not failure:
            logger.warning("Renewed the leases again")
        self._failing = bool(failure)
        return not failure

    def _hold_again(self, lists: InflightLists, inflight: str, queue: str, lease: float) -> None:
        """Register a list whose lease was gone, unless its channel let go of it meanwhile."""
        with self._lock:
            if inflight not in self._held:
                return
            # The lease ran out while this process lived (or Redis lost it): a sweep may have put its
            # messages back, so a task running here may also run elsewhere (at least once).
            logger.warning("Lease of %s was gone; registered again (its tasks may run twice)", inflight)
            self._lost.add(inflight)  # its channel drops the messages it still holds in memory
            lists.hold({inflight: queue}, lease)

    def _run(self) -> None:
        pid = os.getpid()
        renewed = True
        while pid == self._pid:
            leases = [lease for _, _, lease in list(self._held.values())] or [30.0]
            time.sleep(min(leases) / 3 if renewed else min(RENEW_RETRY, min(leases) / 3))
            renewed = self.renew_all()


KEEPER = LeaseKeeper()


def inflight_name(queue: str, token: str) -> str:
    """The inflight list of one consumer (token) of one queue."""
    return f"{REGISTRY_KEY}:{token}:{queue}"
