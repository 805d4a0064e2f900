"""Long delays wait in proj's delayed set, not in the broker: the one parking path, and its release.

Why: on Redis a message with a far ETA sits in a worker's memory and comes back every visibility
timeout, so long retry delays would force the timeout up and with it the time a killed worker's
tasks wait. Every task message leaves through a kombu producer's `publish` (`.delay()`,
`apply_async`, `send_task` by name, retries, canvases, `enqueue_many`), so `ParkingProducer` is the
one place that decides: a message due further ahead than celeryconfig's `broker_max_countdown` is
published through a channel of the same transport whose only change is
that its `_put` adds the serialised message to the delayed set (`proj.stores.delayed`) instead of
pushing it onto the queue. It is byte for byte what the broker would have held, so when
`DelayedRelease` moves it onto its queue a worker runs it as if it had waited in the broker. This
works the same whether proj's kombu transport or kombu's own runs (PROJ_STOCK_CELERY).
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import redis
from celery import Task, bootsteps
from celery.exceptions import Retry
from kombu import Connection, Producer
from kombu.transport import virtual
from kombu.utils.json import dumps

from proj.integration.requeue import requeue_instead
from proj.stores.connection import redis_client
from proj.stores.delayed import DelayedSet, eta_epoch

logger = logging.getLogger(__name__)

# How often each worker moves due messages onto their queues; also the extra delay they can get.
RELEASE_INTERVAL = 1.0
# The setting (celeryconfig) that holds the longest delay the broker itself keeps.
PARK_AFTER_SETTING = "broker_max_countdown"


class _ParkingChannelMixin:
    """Put a message into the delayed set, due at its ETA, instead of onto its queue list."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        channel: Any = self
        priority = channel._get_message_priority(message, reverse=False)
        with channel.conn_or_acquire() as client:
            DelayedSet(client).add(
                channel._q_for_pri(queue, priority), dumps(message), eta_epoch(message["headers"]["eta"])
            )


_parking_transports: dict[Any, type] = {}


def parking_transport(transport_cls: Any) -> type:
    """`transport_cls` with a channel that parks instead of pushing (one class per transport)."""
    parking = _parking_transports.get(transport_cls)
    if parking is None:
        channel = type(
            f"Parking{transport_cls.Channel.__name__}", (_ParkingChannelMixin, transport_cls.Channel), {}
        )
        parking = type(f"Parking{transport_cls.__name__}", (transport_cls,), {"Channel": channel})
        _parking_transports[transport_cls] = parking
    return parking


def parks_on(connection: Any) -> bool:
    """Whether long delays park here: on Redis transports only. RabbitMQ holds them itself (Celery's
    native delayed delivery for quorum queues, celeryconfig), so no worker holds them unacknowledged."""
    return isinstance(connection.transport, virtual.Transport) and connection.transport.driver_type == "redis"


def due_in(headers: dict[str, Any] | None) -> float:
    """Seconds until the message with these headers is due (0 for a message without an ETA)."""
    eta = (headers or {}).get("eta")
    return eta_epoch(eta) - time.time() if eta else 0.0


class ParkingProducer(Producer):
    """kombu's producer; a message due later than `app_conf.broker_max_countdown` goes to the delayed set."""

    #: The Celery app's configuration (set on the class the app's AMQP helper makes); None: never park.
    app_conf: Any = None

    def publish(self, body: Any, routing_key: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Publish as kombu does, or into the delayed set when the message is due far ahead."""
        park_after = None if self.app_conf is None else self.app_conf.get(PARK_AFTER_SETTING)
        connection: Any = self.connection
        if (
            park_after is None
            or not parks_on(connection)
            or due_in(kwargs.get("headers")) <= float(park_after)
        ):
            return super().publish(body, routing_key, *args, **kwargs)
        # Connection, not clone(): a pooled connection's class needs its pool.
        settings = {**connection.info(), "transport": parking_transport(type(connection.transport))}
        with Connection(**settings) as parking:
            producer = Producer(parking.default_channel, exchange=self.exchange, auto_declare=False)
            return producer.publish(body, routing_key, *args, **kwargs)


def reschedule(
    task: Task,  # type: ignore[type-arg]
    countdown: float,
    reason: str,
) -> NoReturn:
    """Run this task again in `countdown` seconds without counting a retry (rate limits, not faults).

    If the new message cannot be published (Redis full, unreachable), this one goes back to its
    queue instead (proj.integration.requeue): it is never dropped.
    """
    request = task.request
    signature = task.signature_from_request(request, countdown=countdown, retries=request.retries)
    try:
        signature.apply_async()
    except Exception as exc:
        raise requeue_instead(task.name, request.id, exc) from exc
    raise Retry(reason, when=countdown, sig=signature)  # type: ignore[arg-type]


def declare_all_queues(app: Any) -> None:
    """Declare every queue of the app, not only the consumed ones: Celery's native delayed delivery
    binds them all at worker start and logs an error for each that does not exist yet."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
            channel = connection.default_channel
            for queue in app.amqp.queues.values():
                queue.bind(channel).declare()
    except Exception as exc:  # the worker's own declaration and reconnects take over from here
        logger.warning("Could not declare the queues for delayed delivery: %s", exc)


class DelayedRelease(bootsteps.StartStopStep):
    """Worker step: every RELEASE_INTERVAL, move due delayed messages onto their queues."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None
        self.delayed: DelayedSet | None = None

    def start(self, worker: Any) -> None:
        with worker.app.connection_for_write() as connection:
            parks = parks_on(connection)
        if not parks:
            # RabbitMQ: nothing is parked (see parks_on), and the release pushes onto Redis lists.
            logger.info("Delayed release off: the broker holds delayed messages itself")
            declare_all_queues(worker.app)
            return
        self.delayed = DelayedSet(redis_client(worker.app.conf.broker_url))
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
