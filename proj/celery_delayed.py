"""Celery glue for proj.delayed: a Task base that parks long delays, and the worker step releasing them.

`DelayedTask.apply_async` (and so `retry`, autoretry and `reschedule`) publishes any message whose
countdown/ETA lies further ahead than `broker_max_countdown` through a kombu Redis channel whose only
change is that it ZADDs the fully serialised message to the delayed set instead of LPUSHing it. The
message is byte for byte what the broker would have held (same id, retries, ETA, headers), so when
`DelayedRelease` moves it onto the queue a worker runs it as if it had waited in the broker.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, NoReturn

import redis
from celery import Task, bootsteps
from celery.exceptions import Retry
from kombu import Connection, Producer
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from proj.delayed import DelayedSet, eta_epoch

logger = logging.getLogger(__name__)

# How often each worker moves due messages onto their queues; also the extra delay they can get.
RELEASE_INTERVAL = 1.0


class _ParkingChannel(kombu_redis.Channel):
    """A kombu Redis channel that parks task messages carrying an ETA in the delayed set."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        eta = (message.get("headers") or {}).get("eta")
        if not eta:
            super()._put(queue, message, **kwargs)
            return
        priority = self._get_message_priority(message, reverse=False)
        key = self._q_for_pri(queue, priority)  # type: ignore[attr-defined]
        with self.conn_or_acquire() as client:
            DelayedSet(client).add(key, dumps(message), eta_epoch(eta))


class _ParkingTransport(kombu_redis.Transport):
    Channel = _ParkingChannel


def _delay_of(options: dict[str, Any]) -> float:
    """How far ahead the options schedule a message, in seconds (0 when not delayed)."""
    eta = options.get("eta")
    if isinstance(eta, str):
        return eta_epoch(eta) - datetime.now(UTC).timestamp()
    if isinstance(eta, datetime):
        aware = eta if eta.tzinfo else eta.replace(tzinfo=UTC)
        return (aware - datetime.now(UTC)).total_seconds()
    return float(options.get("countdown") or 0)


class DelayedTask(Task):  # type: ignore[type-arg]
    """Base for tasks whose retries may wait long: such delays never sit in the broker."""

    # Only delayed messages differ from Celery's: proj.bulk may copy the others' messages.
    apply_async_copyable = True

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Publish as usual, or into the delayed set when the delay exceeds broker_max_countdown."""
        limit = float(self.app.conf.get("broker_max_countdown", 30))
        if producer is not None or _delay_of(options) <= limit:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        conn = Connection(
            self.app.conf.broker_url,
            transport=_ParkingTransport,
            transport_options=dict(self.app.conf.broker_transport_options or {}),
        )
        with conn:
            parking = Producer(conn.default_channel)
            return super().apply_async(args, kwargs, task_id, parking, link, link_error, shadow, **options)


def reschedule(
    task: Task,  # type: ignore[type-arg]
    countdown: float,
    reason: str,
) -> NoReturn:
    """Run this task again in `countdown` seconds without counting a retry (rate limits, not faults)."""
    request = task.request
    signature = task.signature_from_request(request, countdown=countdown, retries=request.retries)
    signature.apply_async()
    raise Retry(reason, when=countdown, sig=signature)  # type: ignore[arg-type]


class DelayedRelease(bootsteps.StartStopStep):
    """Worker step: every RELEASE_INTERVAL, move due delayed messages onto their queues."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None
        self.delayed: DelayedSet | None = None

    def start(self, worker: Any) -> None:
        self.delayed = DelayedSet(redis.Redis.from_url(worker.app.conf.broker_url))
        self.tref = worker.timer.call_repeatedly(RELEASE_INTERVAL, self.release)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def release(self) -> None:
        """Release what is due; a Redis hiccup only delays it to the next tick."""
        if self.delayed is None:
            return
        try:
            moved = self.delayed.release_due()
        except redis.RedisError as exc:
            logger.warning("Could not release delayed messages: %s", exc)
            return
        if moved:
            logger.info("Released %d delayed message(s) onto their queues", moved)
