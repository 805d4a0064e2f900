"""Celery signal handlers: dead letters for tasks that failed for good, and publish timestamps."""

from __future__ import annotations

import logging
import time
import traceback as tb
from functools import lru_cache
from typing import Any

import redis
from celery.signals import before_task_publish, task_failure

from proj.settings import get_settings
from proj.stores.deadletters import DeadLetter, DeadLetterStore
from proj.stores.queues import SENT_AT_HEADER

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _store() -> DeadLetterStore:
    """One store per process, created on first failure rather than at import."""
    return DeadLetterStore(redis.Redis.from_url(get_settings().redis_url))


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
    )
    try:
        _store().record(letter)
    except redis.RedisError:
        # The failure is still in the result backend and the log; never fail the worker over it.
        logger.exception("Could not record dead letter for task %s", task_id)
    logger.warning("Task %s[%s] failed for good: %s", letter.task_name, task_id, letter.exc_type)


@before_task_publish.connect
def stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the publish time so `proj status` can tell how old the oldest waiting message is."""
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())
