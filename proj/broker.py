"""kombu's Redis transport, cheaper per message: one client per channel, events not waited for.

Celery glue, selected by `broker_transport` in celeryconfig. Two costs of kombu 5.7's Redis channel
that py-spy shows on every message (docs/benchmarks.md):

- It builds a new `redis.Redis` object for every command outside the consumer's BRPOP (unacked
  bookkeeping, ack, event publish, `.delay()`); with redis-py 8 that costs more than sending the
  command (~17 % of a worker's time). The client is only a view of the channel's connection pool,
  so one per channel is enough; redis-py clients are thread-safe and pipelines stay per call.
- Each event (`task-sent` on every `.delay()`, the worker's batched task events) waits for the
  reply to its PUBLISH, a round trip of its own. Events are monitoring data that Celery itself
  publishes on a best-effort basis, so they go out on a connection of their own whose replies
  (subscriber counts) are read when they have arrived instead of being waited for.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Celery's default `event_exchange`: the fanout exchange of task and worker events.
EVENT_EXCHANGE = "celeryev"
# Replies allowed to be outstanding before the publisher waits for them (bounds socket buffers).
MAX_PENDING_REPLIES = 1000

# Any: kombu's type stubs do not describe the channel internals overridden here.
_RedisChannel: Any = kombu_redis.Channel


class UnawaitedPublisher:
    """PUBLISH on one pooled connection without waiting for each reply; thread- and fork-safe."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._connection: Any = None
        self._pid = 0
        self._pending = 0

    def publish(self, topics: list[str], payload: str) -> None:
        """Send one PUBLISH per topic; a broken connection is dropped and the error raised."""
        with self._lock:
            connection = self._acquire()
            try:
                for topic in topics:
                    connection.send_command("PUBLISH", topic, payload, check_health=False)
                    self._pending += 1
                self._collect(connection)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._drop()
                raise

    def close(self) -> None:
        """Read the outstanding replies and give the connection back to the pool."""
        with self._lock:
            if self._connection is None or self._pid != os.getpid():
                self._connection = None
                return
            try:
                while self._pending:
                    self._read(self._connection)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._drop()
                return
            self._pool.release(self._connection)
            self._connection = None

    def _acquire(self) -> Any:
        if self._connection is None or self._pid != os.getpid():  # a forked child needs its own
            self._connection, self._pid, self._pending = self._pool.get_connection(), os.getpid(), 0
        return self._connection

    def _collect(self, connection: Any) -> None:
        """Read the replies that are already there, and wait only when too many are outstanding."""
        while self._pending and (self._pending > MAX_PENDING_REPLIES or connection.can_read(timeout=0)):
            self._read(connection)

    def _read(self, connection: Any) -> None:
        connection.read_response()
        self._pending -= 1

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.disconnect()
        self._connection, self._pending = None, 0


class Channel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel that reuses its synchronous client and does not wait on event publishes."""

    _sync_client: Any = None
    _events: UnawaitedPublisher | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        """The channel's one synchronous client; a fresh one for the async (BRPOP) side."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._sync_client is None:
            self._sync_client = super()._create_client()
        return self._sync_client

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        """Events go through the unawaited publisher; other fanout messages as kombu sends them."""
        if exchange != EVENT_EXCHANGE or kwargs.get("_publish_batch") is not None:
            super()._put_fanout(exchange, message, routing_key, **kwargs)
            return
        if self._events is None:
            self._events = UnawaitedPublisher(self.pool)
        self._events.publish(self._get_publish_topics(exchange, routing_key), dumps(message))

    def close(self) -> None:
        """Flush the event publisher's replies before the channel goes."""
        if self._events is not None:
            self._events.close()
        super().close()


class Transport(kombu_redis.Transport):
    """The Redis transport with the channel above."""

    Channel = Channel
