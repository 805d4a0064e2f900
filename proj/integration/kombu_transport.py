"""kombu's Redis transport, cheaper per message: one client per channel, fewer waits for replies.

Selected by `broker_transport` in celeryconfig (unless PROJ_STOCK_CELERY=1). Three costs of kombu
5.7's Redis channel that py-spy shows on every message (docs/internals.md):

- It builds a new `redis.Redis` object for every command outside the consumer's BRPOP (unacked
  bookkeeping, ack, event publish, `.delay()`); with redis-py 8 that costs more than sending the
  command (~17 % of a worker's time). The client is only a view of the channel's connection pool,
  so one per channel is enough; redis-py clients are thread-safe and pipelines stay per call.
- A worker waits for the reply to the unacked record of each message (ZADD + HSET) and to its ack
  (ZREM + HDEL): two round trips per task during which a solo worker does nothing. They are sent
  on one connection of their own, in order (proj.integration.unawaited), and the replies read in
  bulk; all of them before the consumer takes its next message, so a refusal stops it there.
- Each event (`task-sent` on every `.delay()`, the worker's task events) waits for the reply to its
  PUBLISH. Events are best-effort monitoring data; they take the same unawaited connection.

A consumer takes messages with BLMOVE into an inflight list of its own per queue
(proj.stores.inflight) instead of BRPOP + an unacked record: the message never leaves Redis (a
worker killed between BRPOP and its record lost the message), one write less runs before each task,
and its ack is an LREM. A consumer of several lists first takes from the first that has a message
(_TAKE_FIRST, one script) and blocks with BLMOVE on one list only when all are empty. Consumers
without acks keep kombu's BRPOP and unacked records, sent without waiting for replies.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from functools import partial
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proj.integration.unawaited import UnawaitedWriter
from proj.stores import setaside
from proj.stores.inflight import KEEPER, InflightLists, inflight_name
from proj.stores.refused import REFUSED_RETRY_SECONDS, RefusedWriteError, refused_for_now, retry_while_refused

logger = logging.getLogger(__name__)

# Celery's default `event_exchange`: the fanout exchange of task and worker events.
EVENT_EXCHANGE = "celeryev"
# Where a consumer puts what it took but cannot read as a kombu message (not a task).
UNREADABLE_KEY = setaside.KEY

# Take a message from the first of several queue lists that has one, into that list's inflight list,
# atomically. KEYS: queue list, inflight list, queue list, inflight list... Returns {n, item} or nil.
_TAKE_FIRST = """
for i = 1, #KEYS, 2 do
  local item = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'RIGHT', 'LEFT')
  if item then return {tostring((i + 1) / 2), item} end
end
return false
"""
# Give back one taken message: remove it from its inflight list and, only if it was still there,
# push its restored copy (a sweep may have put it back already, after a lost lease).
# KEYS: inflight list, then the queue lists. ARGV: the item, then (LPUSH|RPUSH, payload) per queue list.
_GIVE_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
for i = 2, #KEYS do
  redis.call(ARGV[i * 2 - 2], KEYS[i], ARGV[i * 2 - 1])
end
return 1
"""
# Seconds between takes while Redis refuses them (full under noeviction, a read-only replica, a
# master with min-replicas-to-write and no replica in sync: proj.stores.refused).
TAKE_REFUSED_WAIT = 1.0

# Inflight lists a closing channel of this process could not give back (Redis away or refusing
# writes). The process's next channel gives them back before its first take, once its unawaited
# writes (the acks among them) have landed: sooner than their lease and the sweep would.
_LEFT_BEHIND: set[str] = set()
_LEFT_BEHIND_LOCK = threading.Lock()

# Any: kombu's type stubs do not describe the channel internals overridden here.
_RedisChannel: Any = kombu_redis.Channel


def _kombu_message(item: bytes) -> dict[str, Any]:
    """A queue item decoded; ValueError, KeyError or TypeError unless it has all that kombu and proj read.

    kombu's Message needs properties.delivery_tag; the unacked record, a reject and a give-back read
    delivery_info's exchange and routing key. An item without them, once taken, could never be acked
    or rejected and would hold a prefetch slot of its worker for good.
    """
    payload: dict[str, Any] = loads(bytes_to_str(item))
    properties = payload["properties"]
    delivery = properties["delivery_info"]
    # An empty exchange or routing key is valid (the default exchange, a queue bound without a key).
    if not (
        properties["delivery_tag"]
        and isinstance(delivery["exchange"], str)
        and isinstance(delivery["routing_key"], str)
    ):
        raise ValueError("no delivery tag, exchange or routing key")
    return payload


class LeaseLostError(RedisConnectionError):
    """A consumer's lease ran out while it lived: a connection error, so Celery's consumer starts
    again and drops the messages it holds in memory (a sweep has put them back on their queues)."""


class _Pushes:
    """Stands in for the pipeline kombu's restore writes to: keeps its LPUSH/RPUSH for a script."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list[Any] = []

    def lpush(self, key: str, value: Any) -> None:
        self.keys.append(key)
        self.args += ["LPUSH", value]

    def rpush(self, key: str, value: Any) -> None:
        self.keys.append(key)
        self.args += ["RPUSH", value]


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
        if delivery_tag in channel.inflight_tags:  # taken with BLMOVE: its inflight list is the record
            virtual.QoS.append(self, message, delivery_tag)
            return
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
        """Drop the unacked record (ZREM + HDEL), or the message from its inflight list (LREM)."""
        channel: Any = self.channel
        writer = channel.unawaited_writer()
        taken = channel.inflight_tags.pop(delivery_tag, None)
        if taken is not None:  # only taken with BLMOVE when the channel has a writer
            writer.send([("LREM", taken[0], 1, taken[1])])
            virtual.QoS.ack(self, delivery_tag)
            return
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
        """Let the message's unacked record land first: a requeue reads it back from Redis.

        A reject Redis refuses (full: under noeviction it refuses even a MULTI of removals; a
        read-only replica) never reaches the consumer loop: the message stays in Redis, in its
        inflight list or under its unacked record, and the reject is tried again before the next
        take. One Redis cannot take (unreachable) raises, as kombu's does: Celery logs it, and the
        message stays unacked for a later reject, the restore on close, or the sweep.
        """
        channel: Any = self.channel
        taken = channel.inflight_tags.pop(delivery_tag, None)
        if taken is not None:
            redo = partial(
                channel.give_back, *taken, leftmost=True, requeue=requeue
            )  # kombu's order: the back
        else:
            redo = partial(self._reject_unacked, delivery_tag, requeue)
        try:
            channel.flush_unawaited()
            redo()
        except ResponseError as exc:  # refused (full, read-only), not a lost connection
            logger.warning("Could not reject %s (%s); trying again before the next take", delivery_tag, exc)
            channel.redo_later(redo)
        except BaseException:
            # kombu's contract: a reject that fails otherwise raises (Celery logs connection errors)
            # and the message stays unacked, to be rejected again or restored on close.
            if taken is not None:
                channel.inflight_tags[delivery_tag] = taken
            raise
        virtual.QoS.ack(self, delivery_tag)

    def _reject_unacked(self, delivery_tag: str, requeue: bool) -> None:
        """kombu's reject of a message under an unacked record: restore it (or not), drop the record."""
        qos: Any = self  # kombu's stubs do not describe its Redis QoS
        if requeue:
            qos.restore_by_tag(delivery_tag, leftmost=True)  # atomic: record gone and message back
        else:
            qos._remove_from_indices(delivery_tag).execute()

    def restore_unacked(self, client: Any = None) -> Any:
        """Let the records in flight land before putting unacked messages back on their queues.

        A give-back Redis refuses for now (a reconnect to a master that refuses writes) leaves the
        message where it is, in its inflight list or under its unacked record: the lease sweep or
        kombu's visibility sweep puts it back once Redis takes writes again.
        """
        channel: Any = self.channel
        channel.flush_unawaited()
        delivered: Any = self._delivered
        try:
            for delivery_tag in list(delivered):
                taken = channel.inflight_tags.pop(delivery_tag, None)
                if taken is not None:
                    channel.give_back(*taken)  # kombu's order for restored messages: the front
                    delivered.pop(delivery_tag, None)
            return super().restore_unacked(client)
        except ResponseError as exc:
            if not refused_for_now(exc):
                raise
            logger.warning(
                "Could not give back %d taken message(s) (%s); the sweep will", len(delivered), exc
            )
            delivered.clear()
            return None

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's sweep of expired unacked records, then of inflight lists whose lease ran out."""
        channel: Any = self.channel
        try:
            super().restore_visible(start, num, interval)
            moved = channel.inflight_registry().requeue_expired() if channel.unawaited_writer() else 0
        except ResponseError as exc:  # refused for now (full, read-only, no replicas): the next sweep
            logger.warning("Could not sweep unacked messages: %s", exc)
            return
        if moved:
            logger.warning("Requeued %d message(s) of consumers that stopped renewing their lease", moved)


class Channel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel that reuses its synchronous client and does not wait on bookkeeping writes."""

    QoS = QoS
    from_transport_options = (*_RedisChannel.from_transport_options, "inflight_lease")
    #: Seconds an inflight list outlives the last renewal by its process (proj/stores/inflight.py).
    inflight_lease = 60.0
    _sync_client: Any = None
    _writer: UnawaitedWriter | None = None
    _registry: InflightLists | None = None
    _give_back_script: Any = None
    # queue list -> (queue, inflight list) of the take awaiting its reply; None: kombu's BRPOP
    _taking: dict[str, tuple[str, str]] | None = None
    _blocking_on: str | None = None  # the list a BLMOVE waits on; None: the take-first script
    _take_any_next = True  # several queues: try them all first (after a message or an empty wait)
    #: Seconds a queue bind Redis refuses for now is tried again before it fails as a connection
    #: error; 0 (producers: their publish fails at once as it would anyway). Workers set it at start.
    refused_bind_wait = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.inflight_tags: dict[str, tuple[str, bytes]] = {}  # delivery tag -> (inflight list, message)
        self._inflight_lists: dict[str, str] = {}  # queue -> this channel's inflight list
        self._no_ack_queues: set[str] = set()  # consumed without acks: nothing to keep inflight
        self._token = uuid.uuid4().hex
        self._refused_rejects: deque[Callable[[], None]] = deque()  # to run again before the next take
        self._refused_since: float | None = None  # when Redis started refusing BLMOVE
        super().__init__(*args, **kwargs)

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

    def inflight_registry(self) -> InflightLists:
        """The inflight lists and leases, through the channel's synchronous client."""
        if self._registry is None:
            self._registry = InflightLists(self._create_client())
        return self._registry

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Take with BLMOVE (or the take-first script) into this consumer's inflight lists, else BRPOP."""
        self._check_lease()
        self._check_unawaited()
        self._redo_refused_rejects()
        self._give_back_left_behind()
        queues = self._queue_cycle.consume(len(self.active_queues))  # kombu's fair order
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if self.unawaited_writer() is None or any(queue in self._no_ack_queues for queue in queues):
            self._taking = None
            super()._brpop_start(timeout)
            return
        try:
            self._taking = {
                key: (queue, self._inflight_for(key))
                for key, queue in zip(keys, queues * len(self.priority_steps), strict=True)
            }
        except ResponseError as exc:  # registering a new inflight list is a write too
            if not refused_for_now(exc):
                raise
            self._take_refused(exc)
            return  # nothing sent: the next poll starts this take again
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        wait = self.brpop_timeout if timeout is None else timeout
        if len(keys) > 1 and self._take_any_next:
            # Several queues: BLMOVE blocks on one list only, so first take from whichever has a
            # message, atomically; only when all are empty block on one of them (in turn) briefly.
            pairs = [word for key in keys for word in (key, self._taking[key][1])]
            self._blocking_on = None
            self.client.connection.send_command("EVAL", _TAKE_FIRST, len(pairs), *pairs)
            return
        self._blocking_on = keys[0]
        self.client.connection.send_command(
            "BLMOVE", keys[0], self._taking[keys[0]][1], "RIGHT", "LEFT", wait or 0
        )

    def _check_lease(self) -> None:
        """Before taking a message: if a lease of this channel was found gone while it held messages
        taken under it, start again (LeaseLostError) rather than run them: a sweep has given them to
        the queue, so running the copies held here (countdowns waiting in memory) would run them twice."""
        lost = set(KEEPER.take_lost(self._inflight_lists.values()))
        if lost and any(inflight in lost for inflight, _ in self.inflight_tags.values()):
            logger.warning(
                "The lease of %s ran out while this worker held messages taken under it; a sweep has "
                "put them back on their queues: reconnecting to drop the copies held here",
                sorted(lost),
            )
            raise LeaseLostError(f"lease of {sorted(lost)} ran out")

    def _inflight_for(self, key: str) -> str:
        """This channel's inflight list for the queue list `key`, registered before it is used."""
        inflight = self._inflight_lists.get(key)
        if inflight is None:
            inflight = inflight_name(key, self._token)
            KEEPER.hold(self.inflight_registry(), inflight, key, float(self.inflight_lease))
            self._inflight_lists[key] = inflight
        return inflight

    def _brpop_read(self, **options: Any) -> bool:
        """Read the BLMOVE (or take-first) reply and deliver the message (kombu's BRPOP read otherwise)."""
        if self._taking is None:
            return self._brpop_read_many(**options)
        taking, blocking_on = self._taking, self._blocking_on
        try:
            try:
                reply = self._read_reply("BLMOVE", **options)
            except ResponseError as exc:  # BLMOVE writes: refused when Redis is full or read-only
                self._take_refused(exc)
                raise Empty() from None
            if self._refused_since is not None:
                logger.warning(
                    "Redis takes BLMOVE again after %.0fs; taking messages",
                    time.monotonic() - self._refused_since,
                )
                self._refused_since = None
            if blocking_on is None:  # the take-first script: [index of the list, item] or nil
                key, item = (None, None) if not reply else (list(taking)[int(reply[0]) - 1], reply[1])
            else:
                key, item = blocking_on, reply
            self._take_any_next = bool(item) or blocking_on is not None
            if not item or key is None:
                raise Empty()
            queue, inflight = taking[key]
            try:
                payload = _kombu_message(item)
                self.inflight_tags[payload["properties"]["delivery_tag"]] = (inflight, item)
            except (ValueError, KeyError, TypeError):
                self._set_aside(queue, inflight, item)
                raise Empty() from None
            self._queue_cycle.rotate(queue)
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _read_reply(self, command: str, **options: Any) -> Any:
        """The reply to the pending take; on a broken connection, drop it (kombu reconnects next turn)."""
        try:
            return self.client.parse_response(self.client.connection, command, **options)
        except self.connection_errors:
            self.client.connection.disconnect()
            raise

    def _brpop_read_many(self, **options: Any) -> bool:
        """kombu's BRPOP read, except that an item that is not a kombu message is set aside.

        kombu decodes the item outside any handler: JSON that does not parse kills the worker
        ("Unrecoverable error", celery#7975) and one without properties or a delivery tag restarts
        the consumer; either way the item, already popped, is lost.
        """
        try:
            reply = self._read_reply("BRPOP", **options)
            if not reply:
                raise Empty()
            dest, item = reply
            queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            try:
                payload = _kombu_message(item)
            except (ValueError, KeyError, TypeError):
                self._set_aside(queue, None, item)
                raise Empty() from None
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _set_aside(self, queue: str, inflight: str | None, item: bytes) -> None:
        """Move something that is not a kombu message out of the way, kept for a person to look at.

        `inflight` is the list a BLMOVE took it into; None after a BRPOP, which already removed it.
        """
        logger.error("Not a kombu message in %s, moved to the list %s: %r", queue, UNREADABLE_KEY, item[:200])
        with self._create_client().pipeline() as pipe:  # MULTI/EXEC
            if inflight is not None:
                pipe.lrem(inflight, 1, item)
            setaside.keep(pipe, item).execute()

    def _take_refused(self, exc: Exception) -> None:
        """Redis refused the take: nothing was moved. Say so once, and wait before asking again."""
        if self._refused_since is None:
            self._refused_since = time.monotonic()
            logger.error(
                "Redis refuses to hand out messages (%s); asking again every %gs", exc, TAKE_REFUSED_WAIT
            )
        time.sleep(TAKE_REFUSED_WAIT)  # else the loop would ask again at once, thousands of times a second

    def redo_later(self, action: Callable[[], None]) -> None:
        """Remember a reject Redis refused; `_brpop_start` tries it again before the next take."""
        self._refused_rejects.append(action)

    def _redo_refused_rejects(self) -> None:
        """Run again the rejects Redis refused earlier, oldest first; stop at the first refusal."""
        while self._refused_rejects:
            try:
                self._refused_rejects[0]()
            except (ResponseError, *self.connection_errors):
                return
            self._refused_rejects.popleft()
            logger.info("Redis took a reject it had refused")

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """kombu's bind (SADD); in a worker, one Redis refuses for now is tried again for a while.

        A worker's reconnect binds its queues again, before it consumes: to a master that refuses
        writes (a promoted replica waiting for `min-replicas-to-write`) kombu's plain ResponseError
        would end the worker. Still refused after `refused_bind_wait`, it is a connection error:
        Celery's consumer reconnects and binds again.
        """
        bind = partial(super()._queue_bind, exchange, routing_key, pattern, queue)
        if self.refused_bind_wait <= 0:
            bind()
            return
        retry_while_refused(bind, f"the binding of {queue!r}", self.refused_bind_wait)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        """kombu's; remembers queues consumed without acks (e.g. remote-control replies)."""
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def give_back(self, inflight: str, item: bytes, leftmost: bool = False, requeue: bool = True) -> None:
        """Move a taken message from its inflight list back onto its queue (or drop it), atomically;
        nothing if it is no longer there (a sweep gave it back after a lost lease)."""
        payload = loads(bytes_to_str(item))
        delivery = payload["properties"]["delivery_info"]
        pushes = _Pushes()
        if requeue:  # kombu's restore (redelivered flags, bindings, priorities), its pushes kept
            self._do_restore_message(payload, delivery["exchange"], delivery["routing_key"], pushes, leftmost)
        client = self._create_client()
        if self._give_back_script is None:
            self._give_back_script = client.register_script(_GIVE_BACK)
        self._give_back_script(keys=[inflight, *pushes.keys], args=[item, *pushes.args], client=client)

    def release_inflight(self) -> None:
        """Put back whatever is left in this channel's inflight lists and stop renewing them."""
        lists = list(self._inflight_lists.values())
        self._inflight_lists.clear()
        for inflight in lists:
            KEEPER.drop(inflight)
        if not lists:
            return
        writer = self.unawaited_writer()
        if writer is not None:
            settled = writer.settle_unconfirmed()  # acks a lost connection took: else given back too
            writer.close()
            if not settled:
                logger.warning("Redis is away or refuses writes: %s go back once the acks are sent", lists)
                self._leave_behind(lists)
                return
        try:
            moved = self.inflight_registry().requeue(lists)
        except (ResponseError, *self.connection_errors) as exc:
            if isinstance(exc, ResponseError) and not refused_for_now(exc):
                raise
            logger.warning("Could not give back %s on close (%s); trying again later", lists, exc)
            self._leave_behind(lists)
            return
        if moved:
            logger.info("Gave back %d taken message(s) on close", moved)

    @staticmethod
    def _leave_behind(lists: list[str]) -> None:
        """Keep `lists` for the next channel of this process to give back (else their lease ends
        and any consumer's sweep puts the messages back)."""
        with _LEFT_BEHIND_LOCK:
            _LEFT_BEHIND.update(lists)

    def _give_back_left_behind(self) -> None:
        """Give back the inflight lists closed channels left behind; on failure, before the next take."""
        if not _LEFT_BEHIND:  # the common case, on every take: no lock
            return
        with _LEFT_BEHIND_LOCK:
            lists = sorted(_LEFT_BEHIND)
        if not lists:
            return
        writer = self.unawaited_writer()
        if writer is not None and not writer.settle_unconfirmed():
            return  # the acks a lost connection took go first: else a finished message goes back too
        try:
            moved = self.inflight_registry().requeue(lists)
        except (ResponseError, *self.connection_errors) as exc:
            logger.debug("Could not give back %s yet: %s", lists, exc)
            return
        with _LEFT_BEHIND_LOCK:
            _LEFT_BEHIND.difference_update(lists)
        if moved:
            logger.warning("Gave back %d message(s) a closed channel had left in %s", moved, lists)

    def _check_unawaited(self) -> None:
        """Before taking a message: every unawaited write has been answered, and none refused.

        A refused record, ack or inflight move (OOM under noeviction, READONLY after a failover,
        NOREPLICAS, NOAUTH) is sent again; still refused after a while, it raises a connection error
        here: Celery's consumer then reconnects with its retry policy, as for a lost connection;
        what was taken stays in Redis.
        """
        if self._writer is None:
            return
        try:
            self._writer.check()
        except RefusedWriteError as exc:
            logger.error("Stopped taking messages: %s", exc)
            raise

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
        writer.send([("PUBLISH", topic, payload) for topic in topics], resend=False)

    def close(self) -> None:
        """Let the unawaited writes land before the channel (and its restore of unacked) goes."""
        if self._writer is not None:
            self._writer.close()
        try:
            super().close()
        finally:
            self.release_inflight()


class Transport(kombu_redis.Transport):
    """The Redis transport with the channel above."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """The channel above on the master that kombu's Sentinel channel finds (and finds again)."""

    from_transport_options = tuple(
        dict.fromkeys((*Channel.from_transport_options, *kombu_redis.SentinelChannel.from_transport_options))
    )


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with proj's channel (`sentinel://` URLs)."""

    Channel = SentinelChannel


def keep_proj_transport_on_failover() -> None:
    """Make `sentinel` name proj's Sentinel transport (the app calls this unless PROJ_STOCK_CELERY=1).

    kombu's failover moves a connection on to the next `;`-separated URL and picks its transport by
    the scheme, and `sentinel` names kombu's own: after a failover a worker would run without proj's
    layer (inflight lists, refused writes waited out).
    """
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"


def wait_out_refused_binds(**_: Any) -> None:
    """In a worker (the app connects this to `worker_init`): queue binds Redis refuses for now are
    tried again for up to REFUSED_RETRY_SECONDS before they fail as a connection error."""
    Channel.refused_bind_wait = REFUSED_RETRY_SECONDS
