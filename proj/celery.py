"""The Celery application: created once here, configured only from celeryconfig."""

from __future__ import annotations

from celery.signals import worker_init

import celeryconfig
import proj.integration.signals  # noqa: F401  (connects the dead-letter and publish-time handlers)
from proj.integration.dead_letter_mover import DeadLetterMover
from proj.integration.kombu_transport import keep_proj_transport_on_failover, wait_out_refused_binds
from proj.integration.native_delay import Celery
from proj.integration.parking import DelayedRelease
from proj.integration.startup import CredentialCheck  # also makes beat check them (beat_init)
from proj.integration.task_events import BatchedTaskEvents
from proj.integration.watchdog import ConsumerWatchdog

STOCK = celeryconfig.proj_stock_celery
# amqp: its producers park long delays; task_cls: a retry that cannot be published requeues its
# message instead of dropping it (both in both modes: proj features, not replacements).
app = Celery(
    "proj",
    include=["tasks.health", "tasks.email", "tasks.files"],
    amqp="proj.integration.producer:AMQP",
    task_cls="proj.integration.requeue:Task",
)
# A module name rather than an object, so prefork children import it instead of unpickling it.
app.config_from_object("celeryconfig")
# Every worker exits at start, with one line, when Redis refuses its credentials (not retried forever).
app.steps["worker"].add(CredentialCheck)
# Every worker moves due delayed messages (long retry delays) from Redis onto their queues.
app.steps["worker"].add(DelayedRelease)
# Every worker exits (to be restarted) when its consumer stops taking messages (docs/operations.md).
app.steps["worker"].add(ConsumerWatchdog)
# RabbitMQ only: workers of the default queue move dead-lettered messages into proj's stores.
app.steps["consumer"].add(DeadLetterMover)
if not STOCK:
    # A Sentinel failover keeps proj's transport (kombu re-resolves the scheme of the next URL).
    keep_proj_transport_on_failover()
    # A worker's reconnect to a master that refuses writes for now (NOREPLICAS after a promotion)
    # waits to bind its queues instead of exiting; producers still fail at once (docs/sentinel.md).
    worker_init.connect(wait_out_refused_binds, weak=False)
    # Celery reads override_backends when the configuration loads; a process whose first use of the
    # app is AsyncResult(id).get() resolves its backend before that when CELERY_RESULT_BACKEND is set.
    app.loader.override_backends = dict(celeryconfig.override_backends)
    # Task events leave in one PUBLISH per batch, not one per task (docs/internals.md).
    app.steps["consumer"].add(BatchedTaskEvents)
