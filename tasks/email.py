"""Email tasks: thin adapters over proj.mail."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from celery import Task
from celery.app.task import Context
from celery.utils.log import get_task_logger

from proj.celery import app
from proj.errors import RateLimitedError, TransientError
from proj.integration.parking import reschedule
from proj.mail import bulk, get_mailer, validate
from proj.mail.retry import retry_delay
from proj.settings import get_settings

logger = get_task_logger(__name__)

# Retry policy: 4xx and connection trouble only, with proj.mail.retry's delays (2, 4, 8 ... s with
# equal jitter, capped): an SMTP outage shorter than its outage_bound (811 s) loses no message.
EMAIL_MAX_RETRIES = get_settings().email_max_retries
# A bulk send goes round again for its deferred recipients (4xx, rate limits) as often, as late.
BULK_MAX_ROUNDS = EMAIL_MAX_RETRIES


# track_started off: a send takes milliseconds, and the extra STARTED result write cost ~20 % of
# throughput (docs/benchmarks.md); Flower still gets the task-started event.
# No autoretry_for: Celery's backoff has full jitter only, whose delays have no floor.
@app.task(bind=True, track_started=False, max_retries=EMAIL_MAX_RETRIES)
def send_email(
    self: Task[Any, Any],
    to: str | Sequence[str] = (),
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    cc: str | Sequence[str] | None = None,
    bcc: str | Sequence[str] | None = None,
    reply_to: str | Sequence[str] | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Sequence[str] | None = None,
    template: str | None = None,
    context: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Send one message exactly once: {"message_id", "accepted", "refused", "duplicate"}."""
    request = validate(
        to,
        subject,
        text,
        html,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        headers=headers,
        attachments=attachments,
        template=template,
        context=context,
        idempotency_key=idempotency_key,
    )
    try:
        return get_mailer().send(request, owner=self.request.id or "direct")
    except RateLimitedError as exc:
        reschedule(self, exc.retry_after, str(exc))
    except TransientError as exc:
        # Celery's retry (counted, then the error itself once max_retries is spent), our delay.
        raise self.retry(exc=exc, countdown=retry_delay(self.request.retries, get_settings())) from exc


@app.task(bind=True, max_retries=BULK_MAX_ROUNDS)
def send_bulk(
    self: Task[Any, Any], template: str, recipients: list[dict[str, Any]], idempotency_key: str | None = None
) -> dict[str, Any]:
    """Send `template` to each recipient in chunks; PROGRESS shows sent/total; returns the counts."""
    task_id = self.request.id or "direct"

    # The PROGRESS meta names the task, worker and queue like the final one (result_extended) but
    # leaves out the recipient list: written per chunk, it cost a sixth of the worker's CPU.
    def progress(meta: dict[str, int]) -> None:
        request = Context(
            self.request.__dict__,
            args=[],
            kwargs={"template": template, "recipients": len(recipients), "idempotency_key": idempotency_key},
        )
        self.backend.store_result(task_id, meta, "PROGRESS", request=request)

    done = bulk.run(
        get_mailer(),
        template,
        recipients,
        idempotency_key,
        task_id,
        progress,
        last_round=self.request.retries >= BULK_MAX_ROUNDS,
    )
    if done.deferred:
        raise self.retry(
            kwargs={"template": template, "recipients": done.deferred, "idempotency_key": done.bulk_key},
            countdown=max(done.retry_after, retry_delay(self.request.retries, get_settings())),
        )
    return done.result
