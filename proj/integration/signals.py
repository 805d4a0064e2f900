"""Celery signal handlers: dead letters, set-aside messages, and publish timestamps."""

from __future__ import annotations

import base64
import json
import logging
import time
import traceback as tb
from functools import lru_cache
from typing import Any

import redis
from celery import bootsteps
from celery.signals import before_task_publish, celeryd_init, task_failure, task_rejected, task_unknown

from proj.settings import get_settings
from proj.stores.connection import redis_client
from proj.stores.deadletters import REPLAY_OF_HEADER, DeadLetter, DeadLetterStore
from proj.stores.queues import SENT_AT_HEADER
from proj.stores.refused import retry_while_refused
from proj.stores.setaside import KEY as SET_ASIDE_KEY
from proj.stores.setaside import SetAsideStore

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _store() -> DeadLetterStore:
    """One store per process, created on first failure rather than at import."""
    return DeadLetterStore(redis_client(get_settings().redis_url))


@lru_cache(maxsize=1)
def _set_aside_store() -> SetAsideStore:
    """One store per process, created on the first message set aside."""
    return SetAsideStore(redis_client(get_settings().redis_url))


@task_failure.connect
def record_dead_letter(
    sender: Any = None,
    task_id: str = "",
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    """Keep a task that failed for good (after its retries) so `proj dlq replay` can run it again."""
    request = getattr(sender, "request", None)
    letter = DeadLetter(
        task_id=task_id,
        task_name=getattr(sender, "name", "?"),
        args=list(args or []),
        kwargs=dict(kwargs or {}),
        queue=((getattr(request, "delivery_info", None) or {}).get("routing_key")),
        exc_type=type(exception).__name__ if exception else "",
        message=str(exception) if exception else "",
        traceback=str(einfo) if einfo else "".join(tb.format_exception(exception)) if exception else "",
        retries=int(getattr(request, "retries", 0) or 0),
        # Celery keeps a message's own headers on the request, and on the retries it sends.
        replay_of=((getattr(request, "headers", None) or {}).get(REPLAY_OF_HEADER)),
    )
    try:
        # A write Redis refuses for now (full, a promoted replica waiting for its replicas) is
        # waited out, bounded: the dead letter is the one copy of the task left to replay.
        retry_while_refused(lambda: _store().record(letter), f"the dead letter of task {task_id}")
    except redis.RedisError:
        # The failure is still in the result backend and the log; never fail the worker over it.
        logger.exception("Could not record dead letter for task %s", task_id)
    logger.warning("Task %s[%s] failed for good: %s", letter.task_name, task_id, letter.exc_type)


@before_task_publish.connect
def stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the publish time so `proj status` can tell how old the oldest waiting message is."""
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())


# --- messages a worker took but cannot run ------------------------------------------------------
# Celery rejects (unknown task name, refused content type, no task headers) or acks (undecodable
# body) such a message, which deletes it from Redis. A copy goes to the set-aside list first.


def envelope(message: Any) -> bytes:
    """The message as the queue held it: kombu's virtual transport (Redis) keeps its JSON in `_raw`;
    a RabbitMQ message is written in the same shape (body, content type, headers, properties)."""
    if not hasattr(message, "_raw") and hasattr(message, "body") and hasattr(message, "headers"):
        return _amqp_envelope(message)
    raw = getattr(message, "_raw", message)
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        return raw.encode()
    try:
        return json.dumps(raw).encode()
    except (TypeError, ValueError):
        return repr(raw).encode()


def _amqp_envelope(message: Any) -> bytes:
    """A RabbitMQ message as JSON; a body that is not UTF-8 travels base64-encoded, as on Redis."""
    body, encoding = message.body, None
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(body).decode("ascii"), "base64"
    properties = {k: v for k, v in (message.properties or {}).items() if k != "application_headers"}
    if encoding:
        properties["body_encoding"] = encoding
    info = message.delivery_info or {}
    properties["delivery_info"] = {"exchange": info.get("exchange"), "routing_key": info.get("routing_key")}
    kept = {
        "body": body,
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": properties,
    }
    # x-death carries timestamps, and a header may hold any AMQP type: str() whatever JSON lacks.
    return json.dumps(kept, default=str).encode()


def set_aside(message: Any, reason: str) -> None:
    """Keep a copy of `message` in the set-aside list and say so in the log; never raise."""
    info = getattr(message, "delivery_info", None) or {}
    queue = info.get("routing_key", "?") if isinstance(info, dict) else "?"
    raw = envelope(message)
    try:
        retry_while_refused(
            lambda: _set_aside_store().add(raw), f"the set-aside copy of a message from {queue}"
        )
    except redis.RedisError:
        logger.exception("Could not set aside a message from %s (%s): %r", queue, reason, raw[:200])
        return
    logger.error(
        "Set aside a message from %s in the list %s: %s: %r", queue, SET_ASIDE_KEY, reason, raw[:200]
    )


@task_unknown.connect
def set_aside_unknown_task(message: Any = None, name: str = "", **_: Any) -> None:
    """A task name no worker registers (a typo, an old client, a removed task)."""
    set_aside(message, f"unknown task {name!r}")


@task_rejected.connect
def set_aside_rejected(message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    """A message without task headers, or one Celery refuses (content type not accepted, bad fields)."""
    set_aside(message, f"invalid task message: {exc!r}" if exc else "not a task message (no task headers)")


class SetAsideUndecodable(bootsteps.Step):
    """Consumer step: a body that cannot be decoded (pickle, a broken encoding) is set aside too.

    Celery's `Consumer.on_decode_error` logs and acks such a message and sends no signal; this wraps
    it on the consumer before its task consumer is created (Tasks.start reads the attribute).
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        acked = parent.on_decode_error

        def on_decode_error(message: Any, exc: BaseException) -> None:
            set_aside(message, f"cannot decode the body: {exc!r}")
            acked(message, exc)

        parent.on_decode_error = on_decode_error


@celeryd_init.connect
def add_consumer_steps(instance: Any = None, **_: Any) -> None:
    """Before `celery worker` builds its consumer: add the step above (both modes: a proj extension)."""
    if instance is not None:
        instance.app.steps["consumer"].add(SetAsideUndecodable)
