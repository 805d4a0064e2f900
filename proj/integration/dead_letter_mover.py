"""Consumer step (RabbitMQ only): move RabbitMQ's dead-lettered messages into proj's stores.

Celery glue. On RabbitMQ every proj queue dead-letters to the exchange `proj.dead` (celeryconfig),
at least once: a message over the delivery limit (a task that kills its worker each time) stays in
its queue until the quorum queue `proj.dead` has it. Workers that consume the `default` queue also
consume `proj.dead` on a channel of their own and, for each message:

- over the delivery limit (`x-first-death-reason: delivery_limit`) and a readable task message:
  a dead letter in proj's store (`proj dlq list`, `proj dlq replay`), and its result FAILURE
  (DeliveryLimitExceeded) unless it is a SUCCESS;
- unreadable (not a task message, a body that does not decode) or dead-lettered for a reason proj
  does not expect: a copy in the set-aside list (proj:unreadable);
- `rejected`: Celery rejects only a message it cannot run (unknown task, refused content), after
  proj's signal handlers set a copy aside (proj.integration.signals): acknowledged, logged.

It acknowledges a message only once Redis has it; when the write fails the message goes back to
`proj.dead` after a pause, so a worker that dies in between loses nothing.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from celery import bootsteps, states
from kombu import Consumer

from proj.errors import DeliveryLimitExceeded
from proj.integration.native_delay import AMQP_SCHEMES
from proj.integration.signals import envelope
from proj.settings import get_settings
from proj.stores.connection import redis_client
from proj.stores.deadletters import REPLAY_OF_HEADER, DeadLetter, DeadLetterStore
from proj.stores.refused import retry_while_refused
from proj.stores.setaside import SetAsideStore

logger = logging.getLogger(__name__)

# The queue whose workers run the mover: every deployment has workers for it.
MOVER_QUEUE = "default"
# Seconds before a message whose store write failed goes back to proj.dead (one held meanwhile).
RETRY_PAUSE = 5.0
# How long a write Redis refuses for now is sent again before the message goes back (the event
# loop waits meanwhile, so much shorter than the signal handlers' wait).
REFUSED_WAIT = 5.0
DELIVERY_LIMIT_EXCEEDED = DeliveryLimitExceeded.__name__


def death_reason(headers: dict[str, Any]) -> str:
    """Why RabbitMQ dead-lettered the message first (delivery_limit, rejected, expired, maxlen)."""
    reason = headers.get("x-first-death-reason")
    if not reason:
        deaths = headers.get("x-death") or [{}]
        reason = deaths[-1].get("reason", "")
    return str(reason or "unknown")


def _death_time(headers: dict[str, Any]) -> float | None:
    """When the message was dead-lettered, as RabbitMQ recorded it (whole seconds, UTC)."""
    for death in headers.get("x-death") or []:
        when = death.get("time")
        if isinstance(when, datetime):
            return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return None


def dead_letter_from(headers: dict[str, Any], body: bytes, limit: int | None) -> DeadLetter | None:
    """The dead letter of a Celery task message (protocol 2) over the delivery limit; None if unreadable."""
    task_id, task_name = headers.get("id"), headers.get("task")
    if not isinstance(task_id, str) or not isinstance(task_name, str):
        return None
    try:
        args, kwargs, _embed = json.loads(body)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return None
    queue = headers.get("x-first-death-queue")
    times = f"{limit + 1} times" if limit is not None else "more often than its limit"
    message = (
        f"delivered {times} without being acknowledged (its worker died or rejected it each time): "
        f"RabbitMQ dead-lettered it (delivery_limit, x-delivery-limit {limit if limit is not None else '?'})"
    )
    return DeadLetter(
        task_id=task_id,
        task_name=task_name,
        args=args,
        kwargs=kwargs,
        queue=str(queue) if queue else None,
        exc_type=DELIVERY_LIMIT_EXCEEDED,
        message=message,
        failed_at=_death_time(headers) or datetime.now(UTC).timestamp(),
        retries=int(headers.get("retries") or 0),
        replay_of=headers.get(REPLAY_OF_HEADER),
    )


class DeadLetterMover(bootsteps.ConsumerStep):
    """Consumer step: consume `proj.dead` and keep each message in Redis before acknowledging it."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.app: Any = None
        self.letters: DeadLetterStore | None = None
        self.set_aside: SetAsideStore | None = None
        self.limits: dict[str, int] = {}
        self.timer: Any = None  # the consumer's event-loop timer: gives a message back later

    def start(self, c: Any) -> None:
        conf = c.app.conf
        queue = conf.get("proj_dead_letter_queue")
        if queue is None or not str(conf.broker_url).startswith(AMQP_SCHEMES):
            return  # Redis brokers: proj's signal handlers keep dead letters, there is no proj.dead
        if MOVER_QUEUE not in c.app.amqp.queues.consume_from:
            return
        self.app = c.app
        client = redis_client(get_settings().redis_url)
        self.letters, self.set_aside = DeadLetterStore(client), SetAsideStore(client)
        self.limits = {
            name: int(q.queue_arguments["x-delivery-limit"])
            for name, q in c.app.amqp.queues.items()
            if q.queue_arguments and "x-delivery-limit" in q.queue_arguments
        }
        self.timer = c.timer
        super().start(c)
        logger.info("Moving RabbitMQ's dead-lettered messages from %s into proj's stores", queue.name)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        queue = self.app.conf.proj_dead_letter_queue
        # One message at a time: while a write fails, nothing more is taken (prefetch per consumer).
        return [Consumer(channel, queues=[queue], on_message=self.on_message, prefetch_count=1)]

    def on_message(self, message: Any) -> None:
        """Keep the message in Redis, then acknowledge it; on failure give it back after a pause."""
        try:
            self.keep(message)
        except Exception:  # Redis unreachable, or refusing past the wait: the message stays in RabbitMQ
            logger.exception("Could not keep a dead-lettered message; it goes back in %.0f s", RETRY_PAUSE)
            self.timer.call_after(RETRY_PAUSE, lambda: self._give_back(message))
            return
        message.ack()

    @staticmethod
    def _give_back(message: Any) -> None:
        try:
            message.requeue()
        except Exception:  # the channel is gone: RabbitMQ returns the message itself
            logger.debug("Could not requeue a dead-lettered message", exc_info=True)

    def fail_result(self, letter: DeadLetter) -> None:
        """End the task's result in FAILURE, so `result.get()` hears of it; a SUCCESS stays."""
        # A SUCCESS means it ran and only its acknowledgement was lost, each time.
        try:
            backend = self.app.backend
            if backend.get_state(letter.task_id) != states.SUCCESS:
                backend.mark_as_failure(letter.task_id, DeliveryLimitExceeded(letter.message))
        except Exception:  # the dead letter is kept; the result is the caller's convenience
            logger.exception("Could not store the FAILURE of dead-lettered task %s", letter.task_id)

    def keep(self, message: Any) -> None:
        """Record one dead-lettered message where a person will find it."""
        assert self.letters is not None and self.set_aside is not None
        headers = dict(message.headers or {})
        reason = death_reason(headers)
        source = headers.get("x-first-death-queue", "?")
        if reason == "rejected":
            logger.info(
                "Dead-lettered message %s from %s was rejected by a worker, which set a copy aside",
                headers.get("id", "?"),
                source,
            )
            return
        letter = dead_letter_from(headers, message.body, self.limits.get(str(source)))
        if reason == "delivery_limit" and letter is not None:
            store = self.letters
            retry_while_refused(
                lambda: store.record(letter), f"the dead letter of task {letter.task_id}", REFUSED_WAIT
            )
            logger.warning(
                "Task %s[%s] from %s went over the delivery limit: recorded as a dead letter",
                letter.task_name,
                letter.task_id,
                source,
            )
            self.fail_result(letter)
            return
        raw = envelope(message)
        aside = self.set_aside
        retry_while_refused(
            lambda: aside.add(raw), f"the set-aside copy of a message from {source}", REFUSED_WAIT
        )
        logger.error("Set aside a dead-lettered message from %s (%s): %r", source, reason, raw[:200])
