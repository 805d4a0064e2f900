"""Enqueue many tasks at once for application code: one connection, the Redis writes pipelined.

Celery glue (imports celery). Each signature goes through the normal `apply_async` path, so routing,
headers, `before_task_publish` handlers and the `task-sent` event are those of `.delay()`; two things
differ. kombu's producer batch buffers the LPUSH commands and sends them `batch_size` at a time in
one round trip, where `.delay()` waits for each. And the `task-sent` events leave after the messages,
grouped in one `task.multi` event message, the form Celery's workers use for their own events and
every event receiver (Flower, `celery events`) unpacks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery import Celery, Signature
from celery.result import AsyncResult

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
# kombu only pipelines publishes when redis-py will not silently replay them after a timeout
# (a replayed pipeline could push some messages twice); the batch reports failure instead.
_NO_REPLAY = {"retry_on_timeout": False}


class _SentEvents:
    """Stands in for the event dispatcher of `send_task_message`: keeps the `task-sent` events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def publish(self, kind: str, fields: dict[str, Any], producer: Any, **_: Any) -> None:
        """Keep one event instead of publishing it."""
        self.events.append((kind, fields))


def enqueue_many(
    signatures: Iterable[Signature[Any]], *, app: Celery | None = None, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[AsyncResult[Any]]:
    """Publish every signature as `.apply_async()` would, in pipelined batches; their results.

    Raises:
        kombu.exceptions.BatchPublishError: a batch failed part-way; which of its messages
            reached Redis is unknown, so re-enqueue them (proj's tasks are idempotent).
    """
    pending = list(signatures)
    if not pending:
        return []
    app = app or pending[0].app
    sent = _SentEvents()
    with app.connection_for_write(transport_options=_NO_REPLAY) as connection:
        # Any: celery-types' Producer stub predates kombu 5.7's batch().
        producer: Any = app.amqp.Producer(connection, auto_declare=False)
        declared: set[tuple[str, str]] = set()
        with producer.batch(batch_size):
            results = [_publish(sig, producer, declared, sent) for sig in pending]
        _send_events(app, connection, sent.events)
    logger.debug("Enqueued %d tasks in batches of %d", len(results), batch_size)
    return results


def _publish(
    sig: Signature[Any], producer: Any, declared: set[tuple[str, str]], sent: _SentEvents
) -> AsyncResult[Any]:
    """Publish one signature; its queue is declared with the first message that goes there."""
    if "countdown" in sig.options or "eta" in sig.options:
        # Delayed messages take the task's own path: DelayedTask parks long delays outside the
        # broker, which it only does when it chooses the producer itself.
        return sig.apply_async()
    key = (str(sig.task), str(sig.options.get("queue", "")))
    options: dict[str, Any] = {"producer": producer, "retry": False, "event_dispatcher": sent}
    if key in declared:
        # Skip the per-message declare: the queue exists. No retry: a buffered write cannot fail
        # here (the batch's flush reports failure for all of them).
        options["declare"] = ()
    declared.add(key)
    return sig.apply_async(**options)


def _send_events(app: Celery, connection: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Publish the kept `task-sent` events as `task.multi` messages."""
    if not events:
        return
    dispatcher = app.events.Dispatcher(connection, buffer_group=["task"], buffer_limit=DEFAULT_BATCH_SIZE)
    try:
        for type_, fields in events:
            dispatcher.send(type_, **fields)
        dispatcher.flush()
    finally:
        dispatcher.close()
