"""Enqueue many tasks at once for application code: one connection, the Redis writes pipelined.

Celery glue (imports celery). Messages, routing, headers, `before_task_publish` handlers and the
`task-sent` event are those of `.delay()`; three things differ. The first signature of each kind
(task and options) goes through Celery's `apply_async`, the others are copies of its message with
their own id and arguments (proj.integration.message_copies: what `apply_async` would do per
message is done per copy; signatures it cannot copy, such as countdowns, links or canvases, go
through `apply_async`).
kombu's producer batch buffers the LPUSH commands and sends them `batch_size` at a time in one
round trip, where `.delay()` waits for each. And the `task-sent` events leave after the messages,
grouped in one `task.multi` event message, the form Celery's workers use for their own events and
every event receiver (Flower, `celery events`) unpacks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery import Celery, Signature
from celery.result import AsyncResult

from proj.integration.message_copies import Kind, Template, check_arguments, kind_of, record

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

    def last_for(self, task_id: str) -> dict[str, Any] | None:
        """The fields of the last event kept, when it is the one for `task_id`."""
        if self.events and self.events[-1][1].get("uuid") == task_id:
            return self.events[-1][1]
        return None


def enqueue_many(
    signatures: Iterable[Signature[Any]], *, app: Celery | None = None, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[AsyncResult[Any]]:
    """Publish every signature as `.apply_async()` would, in pipelined batches; their results.

    Raises:
        TypeError: a signature's arguments do not fit its task; nothing was published.
        kombu.exceptions.BatchPublishError: a batch failed part-way; which of its messages
            reached Redis is unknown, so re-enqueue them (proj's tasks are idempotent).
    """
    pending = list(signatures)
    if not pending:
        return []
    app = app or pending[0].app
    for sig in pending:
        check_arguments(sig, app)  # all or nothing: a bad argument stops the batch before any publish
    sent = _SentEvents()
    with app.connection_for_write(transport_options=_NO_REPLAY) as connection:
        # Any: celery-types' Producer stub predates kombu 5.7's batch().
        producer: Any = app.amqp.Producer(connection, auto_declare=False)
        publisher = _Publisher(app, producer, sent)
        with producer.batch(batch_size):
            results = [publisher.publish(sig) for sig in pending]
        _send_events(app, connection, sent.events)
    logger.debug("Enqueued %d tasks in batches of %d", len(results), batch_size)
    return results


class _Publisher:
    """Publishes signatures into one producer batch: copies where it can, whole where it must."""

    def __init__(self, app: Celery, producer: Any, sent: _SentEvents) -> None:
        self.app, self.producer, self.sent = app, producer, sent
        self.templates: dict[Kind, Template] = {}

    def publish(self, sig: Signature[Any]) -> AsyncResult[Any]:
        """Publish one signature; its result."""
        if "countdown" in sig.options or "eta" in sig.options:
            # Delayed messages are published one by one (a long delay is parked, not batched).
            return sig.apply_async()
        kind = kind_of(sig, self.app)
        if kind is None:
            return sig.apply_async(producer=self.producer, retry=False, event_dispatcher=self.sent)
        template = self.templates.get(kind)
        if template is None:
            result, self.templates[kind] = record(sig, self.app, self.producer, self.sent)
            return result
        result, event = template.copy(sig, self.app, self.producer)
        if event is not None:
            self.sent.publish("task-sent", event, self.producer)
        parent = self.app.current_worker_task
        if parent:
            parent.add_trail(result)
        return result


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
