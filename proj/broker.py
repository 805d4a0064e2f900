"""kombu's Redis transport, cheaper per message: one client per channel, fewer waits for replies.

Celery glue, selected by `broker_transport` in celeryconfig. Three costs of kombu 5.7's Redis
channel that py-spy shows on every message (docs/benchmarks.md):

- It builds a new `redis.Redis` object for every command outside the consumer's BRPOP (unacked
  bookkeeping, ack, event publish, `.delay()`); with redis-py 8 that costs more than sending the
  command (~17 % of a worker's time). The client is only a view of the channel's connection pool,
  so one per channel is enough; redis-py clients are thread-safe and pipelines stay per call.
- A worker waits for the reply to the unacked record of each message (ZADD + HSET) and to its ack
  (ZREM + HDEL): two round trips per task during which a solo worker does nothing. They are sent
  on one connection of their own, in order, and the replies read when they have arrived.
- Each event (`task-sent` on every `.delay()`, the worker's task events) waits for the reply to its
  PUBLISH. Events are best-effort monitoring data; they take the same unawaited connection.

Nothing changes on the wire: the same commands, in the same MULTI/EXEC blocks, in the same order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

# Celery's default `event_exchange`: the fanout exchange of task and worker events.
EVENT_EXCHANGE = "celeryev"
# Replies left unread until this many are outstanding, then read together: reading them one by
# one as they arrive cost a solo worker two receive syscalls per task, before each task ran.
COLLECT_AT = 256
# Replies allowed to be outstanding before the publisher waits for them (bounds socket buffers).
MAX_PENDING_REPLIES = 1000

# Any: kombu's type stubs do not describe the channel internals overridden here.
_RedisChannel: Any = kombu_redis.Channel


class UnawaitedWriter:
    """Commands on one pooled connection, replies read when they are there; thread- and fork-safe.

    Redis answers a connection's commands in order, so what is sent here is applied in the order
    it was sent; only the wait for each reply is skipped. Replies are read in bulk (COLLECT_AT), so
    an error reply is logged up to that many commands later; a broken connection is dropped and its
    error raised to the caller of `send`.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._connection: Any = None
        self._pid = 0
        self._pending = 0

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        """Send the commands (one reply each) and read the replies that have already arrived."""
        with self._lock:
            connection = self._acquire()
            try:
                connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                self._pending += len(commands)
                self._collect(connection)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._drop()
                raise

    def flush(self) -> None:
        """Wait for every outstanding reply: what was sent has been applied."""
        with self._lock:
            if self._connection is None or self._pid != os.getpid():
                return
            try:
                while self._pending:
                    self._read(self._connection)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._drop()
                raise

    def close(self) -> None:
        """Flush and give the connection back to the pool."""
        try:
            self.flush()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._pool.release(self._connection)
            self._connection = None

    def _acquire(self) -> Any:
        if self._connection is None or self._pid != os.getpid():  # a forked child needs its own
            self._connection, self._pid, self._pending = self._pool.get_connection(), os.getpid(), 0
        return self._connection

    def _collect(self, connection: Any) -> None:
        """Once COLLECT_AT are outstanding, read the replies already there; wait only past the limit."""
        if self._pending < COLLECT_AT:
            return
        while self._pending and (self._pending > MAX_PENDING_REPLIES or connection.can_read(timeout=0)):
            self._read(connection)

    def _read(self, connection: Any) -> None:
        self._pending -= 1
        try:
            connection.read_response()
        except ResponseError as exc:
            logger.warning("Redis refused an unawaited command: %s", exc)

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.disconnect()
        self._connection, self._pending = None, 0


class QoS(kombu_redis.QoS):
    """Unacked bookkeeping sent without waiting: a solo worker otherwise waits on Redis twice a task.

    The MULTI/EXEC blocks are kombu's; they go through the channel's unawaited writer, so a message
    is recorded as unacked before its ack on the same connection, in that order. Waiting for the
    reply to the record would not make it safer: the message has already left the queue (BRPOP).
    """

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record the message as unacked (ZADD + HSET), then remember it in memory."""
        channel: Any = self.channel
        writer = channel.unawaited_writer()
        if writer is None:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        payload = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        writer.send(
            [
                ("MULTI",),
                ("ZADD", self.unacked_index_key, time.time(), delivery_tag),
                ("HSET", self.unacked_key, delivery_tag, payload),
                ("EXEC",),
            ]
        )
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Drop the unacked record (ZREM + HDEL)."""
        channel: Any = self.channel
        writer = channel.unawaited_writer()
        if writer is None:
            super().ack(delivery_tag)
            return
        writer.send(
            [
                ("MULTI",),
                ("ZREM", self.unacked_index_key, delivery_tag),
                ("HDEL", self.unacked_key, delivery_tag),
                ("EXEC",),
            ]
        )
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Let the message's unacked record land first: a requeue reads it back from Redis."""
        channel: Any = self.channel
        channel.flush_unawaited()
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> Any:
        """Let the records in flight land before putting unacked messages back on their queues."""
        channel: Any = self.channel
        channel.flush_unawaited()
        return super().restore_unacked(client)


class Channel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel that reuses its synchronous client and does not wait on bookkeeping writes."""

    QoS = QoS
    _sync_client: Any = None
    _writer: UnawaitedWriter | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        """The channel's one synchronous client; a fresh one for the async (BRPOP) side."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._sync_client is None:
            self._sync_client = super()._create_client()
        return self._sync_client

    def unawaited_writer(self) -> UnawaitedWriter | None:
        """The channel's unawaited writer; None with a global key prefix (raw commands skip it)."""
        if self.global_keyprefix:
            return None
        if self._writer is None:
            self._writer = UnawaitedWriter(self.pool)
        return self._writer

    def flush_unawaited(self) -> None:
        """Wait until everything sent unawaited has been applied."""
        if self._writer is not None:
            self._writer.flush()

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        """Events go through the unawaited writer; other fanout messages as kombu sends them."""
        writer = self.unawaited_writer()
        if exchange != EVENT_EXCHANGE or kwargs.get("_publish_batch") is not None or writer is None:
            super()._put_fanout(exchange, message, routing_key, **kwargs)
            return
        payload, topics = dumps(message), self._get_publish_topics(exchange, routing_key)
        writer.send([("PUBLISH", topic, payload) for topic in topics])

    def close(self) -> None:
        """Let the unawaited writes land before the channel (and its restore of unacked) goes."""
        if self._writer is not None:
            self._writer.close()
        super().close()


class Transport(kombu_redis.Transport):
    """The Redis transport with the channel above."""

    Channel = Channel
