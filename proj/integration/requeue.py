"""proj's task class: expected failures logged as such, and unpublishable retries requeued.

Celery logs an exception listed in `Task.throws` as "raised expected", at INFO and without a
traceback, and still records FAILURE, calls errbacks and sends `task_failure` (the dead letters).
A permanent error is such an expected failure: bad input, told in one line. Everything else
(transient errors whose retries ran out, bugs) keeps Celery's ERROR with its traceback.

A retry or reschedule that cannot be published leaves its message to be delivered again.

Celery's `Task.retry` turns a failed publish of the retry into `Reject(requeue=False)`: with
acks_late on Redis the message is then dropped, and a task that only wanted to wait (SMTP 4xx, a
rate limit) is lost because Redis was full, read-only after a failover, or briefly unreachable at
that moment. proj's task class requeues the message instead: the work it carries is still to do.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task as CeleryTask
from celery.exceptions import Reject

from proj.errors import PermanentError

logger = logging.getLogger(__name__)


def requeue_instead(task_name: str, task_id: str | None, exc: Exception) -> Reject:
    """The Reject that puts the message back, logged with the reason the publish failed."""
    logger.warning(
        "Could not publish the retry of %s[%s] (%s: %s); its message goes back to the queue",
        task_name,
        task_id,
        type(exc).__name__,
        exc,
    )
    return Reject(exc, requeue=True)


class Task(CeleryTask):  # type: ignore[type-arg]
    """Celery's Task; permanent errors are expected failures, a failed retry publish requeues."""

    throws = (PermanentError,)

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's retry; `Reject(requeue=False)` from a failed publish becomes a requeue."""
        try:
            return super().retry(*args, **kwargs)
        except Reject as rejected:
            reason = getattr(rejected, "reason", None)  # celery-types does not know the attribute
            if getattr(rejected, "requeue", False) or not isinstance(reason, Exception):
                raise
            raise requeue_instead(self.name, self.request.id, reason) from reason
