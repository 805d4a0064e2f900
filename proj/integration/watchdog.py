"""Worker step: notice a consumer that no longer consumes, say why, and exit so it is started again.

A worker whose process is alive but whose consumer takes nothing (its blocking BLMOVE/BRPOP
connection black-holed, a reconnect that never re-registered it, a stall that outlasted every
timeout) looks healthy to its supervisor. Every window/6 seconds this step reads the length of each
queue the worker consumes and compares it with what the worker received: a queue that held messages
for a whole window while this worker, with a free slot, received nothing, is stalled. The step then
logs one ERROR line and makes the worker exit with STALLED_EXIT_CODE; its supervisor (compose
`restart:`, the local stack) starts it again, and what it had taken comes back through the inflight
lease or visibility timeout as after any exit.

It runs in a thread of its own with its own Redis client: the worker's timer runs on the event loop
(threads, solo) and a Redis call blocked there on a dead socket would stall the check with it.

On RabbitMQ the same check reads each queue's ready messages by a passive `queue_declare` on a
connection of its own (read and write timeouts of one interval at most): a queue whose consumer
RabbitMQ cancelled (a deleted and declared again queue) or that a stuck channel no longer receives
from holds messages while the worker, free, receives nothing. Consumption stamps (`proj status
--check`) are Redis-only and not written there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from celery import bootsteps, signals
from celery.worker import state
from kombu import Connection

from proj.integration.native_delay import AMQP_SCHEMES
from proj.settings import REDIS_BROKER_SCHEMES, get_settings
from proj.stores.connection import redis_client
from proj.stores.consumption import ConsumptionStamps
from proj.stores.queues import queue_stats

logger = logging.getLogger(__name__)

#: Exit status of a worker stopped for a stalled consumer (EX_TEMPFAIL: start it again).
STALLED_EXIT_CODE = 75
# Checks per window: a stall is noticed between one window and 7/6 of it after it began.
CHECKS_PER_WINDOW = 6


@dataclass
class StallWatch:
    """The decision alone: fed one sample per check, it names the queues stalled for a whole window."""

    window: float
    since: dict[str, float] = field(default_factory=dict)  # queue -> first sample of its stall
    received: int | None = None  # the worker's count of received messages at the previous sample

    def reset(self) -> None:
        """Forget what was seen: the next sample starts afresh (consumer not running, Redis unknown)."""
        self.since.clear()
        self.received = None

    def observe(
        self, now: float, received: int, free: bool, depths: dict[str, int]
    ) -> tuple[list[str], list[str]]:
        """Return (queues accounted for, queues stalled) from one sample.

        A queue is accounted for when it is empty, the worker received something since the previous
        sample, or the worker has no free slot (busy with long tasks is not stalled).
        """
        took = self.received is not None and received != self.received
        self.received = received
        fine, stalled = [], []
        for queue, depth in depths.items():
            if depth == 0 or took or not free:
                self.since.pop(queue, None)
                fine.append(queue)
                continue
            started = self.since.setdefault(queue, now)
            if now - started >= self.window:
                stalled.append(queue)
        return fine, stalled

    def stalled_for(self, now: float, queues: list[str]) -> float:
        """Seconds since the earliest of these queues began to stall."""
        return now - min(self.since[queue] for queue in queues)


_received = 0  # messages this process's consumer received: tasks, and unknown or rejected ones


@signals.task_received.connect(weak=False)
@signals.task_unknown.connect(weak=False)
@signals.task_rejected.connect(weak=False)
def _count_received(sender: Any = None, **kwargs: Any) -> None:
    """Count a message taken off a queue (sent by the consumer's thread only; the watchdog reads it)."""
    global _received
    _received += 1


class ConsumerWatchdog(bootsteps.StartStopStep):
    """Worker step: the stall check above, in its own daemon thread, when PROJ_STALL_WINDOW is not 0."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.window = get_settings().stall_window
        self.interval = self.window / CHECKS_PER_WINDOW
        self.watch = StallWatch(self.window)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.worker: Any = None
        self.client: redis.Redis[bytes] | None = None
        self.amqp: Connection | None = None  # RabbitMQ brokers: the watchdog's own connection
        self.depths: dict[str, int] = {}  # the last sample's ready messages per queue

    def start(self, worker: Any) -> None:
        if self.window <= 0:
            return
        url = str(worker.app.conf.broker_url)
        # Its own connection: the worker's are the ones that may be stuck. A timeout here means
        # "cannot tell", and the next sample connects afresh.
        timeout = min(max(self.interval, 0.5), 5.0)
        if url.startswith(REDIS_BROKER_SCHEMES):
            self.client = redis_client(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        elif url.startswith(AMQP_SCHEMES):
            self.amqp = worker.app.connection_for_read(
                connect_timeout=timeout,
                heartbeat=0,  # nothing services heartbeats between samples; the timeouts bound each read
                transport_options={"read_timeout": timeout, "write_timeout": timeout},
            )
        else:
            logger.info("Consumer watchdog off: it reads Redis or RabbitMQ queues and the broker is neither")
            return
        self.worker = worker
        self.thread = threading.Thread(target=self.run, name="proj-consumer-watchdog", daemon=True)
        self.thread.start()

    def stop(self, worker: Any) -> None:
        self.stopping.set()
        if self.amqp is not None:
            self.amqp.collect()  # drop the socket without a close handshake: the thread may be reading it

    def read_depths(self, queues: list[str]) -> dict[str, int]:
        """Messages waiting in each queue: Redis list lengths, or RabbitMQ's ready count."""
        if self.amqp is not None:
            channel: Any = self.amqp.default_channel
            return {
                queue: int(channel.queue_declare(queue=queue, passive=True).message_count) for queue in queues
            }
        assert self.client is not None
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))

    def _read_errors(self) -> tuple[type[BaseException], ...]:
        if self.amqp is None:
            return (redis.RedisError,)
        return (OSError, *self.amqp.connection_errors, *self.amqp.channel_errors)

    def run(self) -> None:
        """Check every interval until the worker stops."""
        while not self.stopping.wait(self.interval):
            try:
                stalled = self.check()
            except Exception:  # the watchdog must outlive its own bugs: log, and try again
                logger.exception("Consumer watchdog check failed")
                self.watch.reset()
                continue
            if stalled:
                self.exit(stalled)
                return

    def queues(self) -> list[str] | None:
        """Names of the queues the worker's task consumer consumes; None while it is not running."""
        consumer = getattr(self.worker, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return None
        return [queue.name for queue in task_consumer.queues]

    def free(self) -> bool:
        """Whether the worker would take another message: fewer reserved requests than its prefetch."""
        limit = getattr(self.worker.consumer, "initial_prefetch_count", 0) or 0
        return not limit or len(state.reserved_requests) < limit

    def check(self) -> list[str]:
        """Take one sample; stamp the queues accounted for and return the stalled ones."""
        queues = self.queues()
        if not queues:
            self.watch.reset()
            return []
        received, free = _received, self.free()
        try:
            depths = self.read_depths(queues)
        except self._read_errors() as exc:
            # An unreachable broker is for Celery's reconnect to handle, not a stall: start afresh.
            logger.debug("Consumer watchdog cannot read queue lengths: %s", exc)
            if self.amqp is not None:
                self.amqp.collect()  # a half-read channel is of no use: connect afresh next time
            self.watch.reset()
            return []
        self.depths = depths
        fine, stalled = self.watch.observe(time.monotonic(), received, free, depths)
        if self.client is None:
            return stalled  # RabbitMQ: consumption stamps are Redis-only
        try:
            ConsumptionStamps(self.client).stamp(fine, self.window)
        except redis.RedisError as exc:
            logger.debug("Consumer watchdog cannot stamp %s: %s", fine, exc)
        return stalled

    def exit(self, stalled: list[str]) -> None:
        """Say why, then stop the worker with STALLED_EXIT_CODE; exit hard if it cannot stop in time."""
        if self.client is None:
            waiting = "; ".join(f"queue {q} ({self.depths.get(q, '?')} message(s) waiting)" for q in stalled)
        else:
            try:
                waiting = "; ".join(_describe(stat) for stat in queue_stats(self.client, stalled))
            except redis.RedisError:
                waiting = ", ".join(stalled)
        stalled_for = self.watch.stalled_for(time.monotonic(), stalled)
        started = datetime.fromtimestamp(time.time() - stalled_for, UTC)
        limit = getattr(self.worker.consumer, "initial_prefetch_count", 0)
        logger.error(
            "Consumer stalled: %s waited since %s (%.0f s, window %g s) while this worker, with %d of %s "
            "slot(s) taken, received nothing; exiting with code %d so that its supervisor starts it again",
            waiting,
            started.strftime("%H:%M:%S UTC"),
            stalled_for,
            self.window,
            len(state.reserved_requests),
            limit or "unlimited",
            STALLED_EXIT_CODE,
        )
        # The consumer loop checks this flag on every turn and raises WorkerShutdown with the code:
        # a warm shutdown, as after SIGTERM, then the process exits with it.
        state.should_stop = STALLED_EXIT_CODE  # type: ignore[assignment]
        grace = _shutdown_grace(self.worker.app.conf)
        time.sleep(grace)
        # Still here: the loop never turned (stuck in a call without a timeout). Exit anyway.
        logger.critical("Worker did not stop within %.0f s of a stalled consumer; exiting now", grace)
        logging.shutdown()
        os._exit(STALLED_EXIT_CODE)


def _describe(stat: Any) -> str:
    age = "" if stat.oldest_age is None else f", oldest sent {stat.oldest_age:.0f} s ago"
    return f"queue {stat.name} ({stat.depth} message(s) waiting{age})"


def _shutdown_grace(conf: Any) -> float:
    """As long as a warm shutdown may take: the hard time limit of running tasks, then the soft shutdown."""
    return float(conf.task_time_limit or 300) + float(conf.worker_soft_shutdown_timeout or 0) + 10.0
