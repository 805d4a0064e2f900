"""`task-sent` events leave a producer in batches, from a background thread, not inside `.delay()`.

Celery glue. Celery publishes the `task-sent` event of every `.delay()` before it returns: one more
Redis write and about 75 us of a round trip's latency on these machines (docs/benchmarks.md). Here
`.delay()` only appends the event (its fields and clock, its own timestamp) to a buffer; a daemon
thread publishes the buffer as one `task.multi` message, the form Celery's workers use for their
own batches and every receiver (Flower, `celery events`) unpacks, `FLUSH_INTERVAL` seconds after
the first event or as soon as `BUFFER_LIMIT` are waiting, and at exit. Events are monitoring data:
a batch that cannot be published (Redis down) is logged and dropped, as a worker's would be; a
forked child starts with an empty buffer and its own thread and connection.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

from celery import Celery
from celery.app import amqp as celery_amqp
from kombu.utils.objects import cached_property

logger = logging.getLogger(__name__)

# The same bounds as the workers' batches (proj.worker_events): Flower sees a send 20 ms later.
FLUSH_INTERVAL = 0.02
BUFFER_LIMIT = 120


class BatchedSentEvents:
    """Stands in for the event dispatcher Celery uses for `task-sent` events of `.delay()`."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._wake = threading.Event()
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._dispatcher: Any = None
        atexit.register(self.flush)
        # A fork can happen while the sender thread holds the lock: the child gets a fresh one.
        os.register_at_fork(after_in_child=self._forget_parent)

    def publish(
        self, type: str, fields: dict[str, Any], producer: Any, blind: bool = False, **_: Any
    ) -> None:
        """Keep the event for the next batch (Celery's signature; its producer is not used)."""
        with self._lock:
            if self._pid != os.getpid():
                self._start_in_this_process()
            self._pending.append((type, dict(fields, timestamp=time.time())))
            if len(self._pending) >= BUFFER_LIMIT:  # a burst: this caller sends the full batch
                batch, self._pending = self._pending, []
                self._publish(batch)
            elif len(self._pending) == 1:
                self._wake.set()

    def flush(self) -> None:
        """Publish what is waiting, now."""
        with self._lock:
            if self._pid != os.getpid() or not self._pending:
                return
            batch, self._pending = self._pending, []
            self._publish(batch)

    def _forget_parent(self) -> None:
        """In a forked child: the parent's lock, buffer, thread and connection are not ours."""
        self._lock = threading.Lock()
        self._pid, self._pending, self._dispatcher, self._thread = 0, [], None, None

    def _start_in_this_process(self) -> None:
        """A fresh buffer, connection and thread: after a fork the parent's are not ours."""
        self._pid, self._pending, self._dispatcher = os.getpid(), [], None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proj-sent-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Wait for a first event, let the batch fill for FLUSH_INTERVAL, publish it; forever."""
        wake = self._wake
        while True:
            wake.wait()
            time.sleep(FLUSH_INTERVAL)
            wake.clear()
            self.flush()

    def _publish(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """One `task.multi` message (called with the lock held: one batch at a time)."""
        try:
            dispatcher = self._dispatcher
            if dispatcher is None:
                connection = self.app.connection_for_write()
                dispatcher = self._dispatcher = self.app.events.Dispatcher(
                    connection, buffer_group=["task"], buffer_limit=BUFFER_LIMIT + 1
                )
            for type_, fields in batch:  # Event keeps the `timestamp` of the send, not the batch's
                dispatcher.send(type_, **fields)
            dispatcher.flush()
        except Exception as exc:
            logger.warning("Dropped %d task-sent events: %s", len(batch), exc)
            self._dispatcher = None


class AMQP(celery_amqp.AMQP):
    """Celery's AMQP helper whose default `task-sent` dispatcher is the batching one above."""

    @cached_property
    def _event_dispatcher(self) -> BatchedSentEvents:
        return BatchedSentEvents(self.app)
