"""A pipeline's outcome recorded under the id of the task that started it: result and task event.

Celery glue. A task that starts a pipeline of other tasks and ends with `Ignore` (Celery's way for a
task whose state is set elsewhere) leaves its id STARTED. The pipeline's last step, or the errback
of the step that failed, then records SUCCESS or FAILURE under that id in the result backend (what
`AsyncResult` reads) and sends the matching `task-succeeded` / `task-failed` event (what Flower
reads: it never looks at the result backend). The id keeps the name it was received under.
`Task.replace` does not do this: the replaced task's id is taken by the replacement's last task
(under that task's name), and when an earlier step fails no event is ever sent for it.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.app.task import Context
from celery.utils.saferepr import saferepr


def origin(request: Any, name: str) -> dict[str, Any]:
    """What the pipeline's steps carry about the task that started it (JSON)."""
    return {
        "id": request.id,
        "name": name,
        "args": list(request.args or []),
        "kwargs": dict(request.kwargs or {}),
        "queue": (request.delivery_info or {}).get("routing_key"),
        "started": time.time(),
    }


def record_success(app: Celery, started_by: dict[str, Any], result: Any, hostname: str | None) -> None:
    """Store `result` as SUCCESS under the starting task's id and tell event monitors."""
    app.backend.mark_as_done(started_by["id"], result, request=_request(started_by, hostname))
    _send(app, "task-succeeded", started_by, hostname, result=saferepr(result))


def record_failure(
    app: Celery, started_by: dict[str, Any], exc: Exception, traceback: str | None, hostname: str | None
) -> None:
    """Store `exc` as FAILURE under the starting task's id and tell event monitors."""
    request = _request(started_by, hostname)
    app.backend.mark_as_failure(started_by["id"], exc, traceback, request=request, call_errbacks=False)
    _send(app, "task-failed", started_by, hostname, exception=saferepr(exc), traceback=traceback or "")


def _request(started_by: dict[str, Any], hostname: str | None) -> Context:
    """A request like the starting task's: the extended result keeps its name, args and queue."""
    return Context(
        id=started_by["id"],
        task=started_by["name"],
        args=started_by["args"],
        kwargs=started_by["kwargs"],
        hostname=hostname,
        delivery_info={"routing_key": started_by.get("queue")},
        retries=0,
    )


def _send(app: Celery, kind: str, started_by: dict[str, Any], hostname: str | None, **fields: Any) -> None:
    """One task event for the starting task's id, as its worker would have sent it."""
    runtime = max(0.0, time.time() - float(started_by.get("started", time.time())))
    with app.events.default_dispatcher(hostname=hostname) as dispatcher:
        dispatcher.send(kind, uuid=started_by["id"], runtime=runtime, **fields)
