"""The Celery application: created once here, configured only from celeryconfig."""

from __future__ import annotations

from celery import Celery

import proj.signals  # noqa: F401  (connects the dead-letter and publish-time handlers)
from proj.celery_delayed import DelayedRelease
from proj.worker_events import BatchedTaskEvents

# amqp: its producer skips the costly re-declaration of queues on every .delay().
app = Celery("proj", include=["tasks.health", "tasks.email", "tasks.files"], amqp="proj.celery_amqp:AMQP")
# A module name rather than an object, so prefork children import it instead of unpickling it.
app.config_from_object("celeryconfig")
# Every worker moves due delayed messages (long retry delays) from Redis onto their queues.
app.steps["worker"].add(DelayedRelease)
# Task events leave in one PUBLISH per batch, not one per task (docs/benchmarks.md).
app.steps["consumer"].add(BatchedTaskEvents)
