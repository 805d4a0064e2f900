"""Celery settings for proj, read from the environment; docs/configuration.md describes each variable."""

from __future__ import annotations

import os

from kombu import Exchange, Queue


def _env_int(name: str, default: int) -> int:
    """Read an integer setting, failing loudly on a typo rather than running with a surprise."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer number of seconds, got {raw!r}") from None


def _env_flag(name: str) -> bool:
    """Read an on/off setting: 1, true, yes or on; anything else unknown fails loudly."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


_redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

# Celery itself lets CELERY_BROKER_URL / CELERY_RESULT_BACKEND override these two.
broker_url = os.environ.get("CELERY_BROKER_URL", _redis_url)
result_backend = os.environ.get("CELERY_RESULT_BACKEND", _redis_url)
# PROJ_STOCK_CELERY=1 runs kombu's own Redis transport, Celery's own Redis result backend, producer
# and event dispatch instead of proj's replacements (docs/internals.md); every proj feature stays.
proj_stock_celery = _env_flag("PROJ_STOCK_CELERY")
if not proj_stock_celery:
    if broker_url.startswith(("redis://", "rediss://")):
        broker_transport = "proj.integration.kombu_transport:Transport"
    elif broker_url.startswith("sentinel://"):
        broker_transport = "proj.integration.kombu_transport:SentinelTransport"
    override_backends = {
        "redis": "proj.integration.result_backend:RedisBackend",
        "rediss": "proj.integration.result_backend:RedisBackend",
        "sentinel": "proj.integration.result_backend:SentinelBackend",
    }

# Pickle in a broker is remote code execution for whoever can write to Redis: JSON only.
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# One queue per workload so each gets the pool it needs (docs/configuration.md, "Queues").
_direct = Exchange("proj", type="direct")
task_queues = (
    Queue("email", _direct, routing_key="email"),
    Queue("email_bulk", _direct, routing_key="email_bulk"),
    Queue("files", _direct, routing_key="files"),
    Queue("default", _direct, routing_key="default"),
)
# RabbitMQ (amqp://): every queue a quorum queue, replicated and with a delivery limit, so a message
# that kills its worker again and again leaves the queue after BROKER_DELIVERY_LIMIT redeliveries
# instead of looping forever. Topic exchange: Celery's native delayed delivery (for quorum queues) routes
# countdowns through RabbitMQ, so no worker holds a message unacknowledged past consumer_timeout.
_amqp_broker = broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))
# RabbitMQ: a message over the delivery limit is dead-lettered to proj.dead (a quorum queue), at
# least once (it stays in its queue until proj.dead has it; RabbitMQ requires reject-publish for
# that), and workers of the default queue move it into proj's dead-letter store
# (proj.integration.dead_letter_mover). None on Redis, where proj's signal handlers keep them.
proj_dead_letter_queue = None
if _amqp_broker:
    proj_dead_letter_queue = Queue(
        "proj.dead", Exchange("proj.dead", type="fanout"), queue_arguments={"x-queue-type": "quorum"}
    )
    _quorum = {
        "x-queue-type": "quorum",
        "x-delivery-limit": _env_int("BROKER_DELIVERY_LIMIT", 5),
        "x-dead-letter-exchange": "proj.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    _topic = Exchange("proj", type="topic")
    task_queues = tuple(  # type: ignore[assignment]  # the same four queues
        Queue(q.name, _topic, routing_key=q.routing_key, queue_arguments=_quorum) for q in task_queues
    )
task_default_queue = "default"
task_default_exchange = "proj"
task_default_routing_key = "default"
# Routing is configuration: callers never pass queue=, and a typo'd queue fails loudly.
task_routes = {
    "tasks.email.send_bulk*": {"queue": "email_bulk"},
    "tasks.email.*": {"queue": "email"},
    "tasks.files.*": {"queue": "files"},
    "tasks.*": {"queue": "default"},
}
task_create_missing_queues = False

# At-least-once: ack after the task ran, and redeliver when the process running it dies.
task_acks_late = True
task_reject_on_worker_lost = True

# Time limits: soft raises inside the task so it can clean up, hard kills the child (prefork).
task_soft_time_limit = _env_int("TASK_SOFT_TIME_LIMIT", 270)
task_time_limit = _env_int("TASK_TIME_LIMIT", 300)

# Longest countdown the broker itself holds; longer delays wait in proj's delayed set instead
# (proj.integration.parking), whichever way the message is published.
broker_max_countdown = _env_int("BROKER_MAX_COUNTDOWN", 30)

# Redis has no acks: an unacked message comes back after this many seconds, so it must outlast
# the hard time limit plus the longest countdown, else running and delayed tasks run twice.
broker_visibility_timeout = _env_int("BROKER_VISIBILITY_TIMEOUT", 360)
if broker_visibility_timeout <= task_time_limit + broker_max_countdown:
    raise ValueError(
        "BROKER_VISIBILITY_TIMEOUT must exceed TASK_TIME_LIMIT + BROKER_MAX_COUNTDOWN "
        f"({broker_visibility_timeout} <= {task_time_limit} + {broker_max_countdown})"
    )
broker_transport_options = {
    "visibility_timeout": broker_visibility_timeout,
    # One list per queue (no priority sub-lists): a worker of one queue then takes each message with
    # BLMOVE into its own inflight list, which its process keeps under this lease (proj/stores/inflight.py);
    # a killed worker's messages go back after the lease instead of the visibility timeout.
    "priority_steps": [0],
    "inflight_lease": _env_int("BROKER_INFLIGHT_LEASE", 60),
    # Sweep for messages of dead workers every N seconds (kombu's default is ~100 s: 10 s x throttle 10),
    # so the worst-case redelivery delay is visibility_timeout + this.
    "unacked_restore_interval": _env_int("BROKER_RESTORE_INTERVAL", 10),
    "unacked_restore_throttle": 1,
    # Probe idle connections so a restarted Redis is noticed instead of silently not consuming.
    "health_check_interval": 10,
    "socket_keepalive": True,
    # A reply overdue by this long drops the connection; a stalled worker's shutdown waits it out too.
    "socket_timeout": _env_int("BROKER_SOCKET_TIMEOUT", 30),
    "socket_connect_timeout": 5,
    "retry_on_timeout": True,
}
if _amqp_broker:
    # Only these apply to RabbitMQ: a publish returns once the broker has the message (at-least-once).
    broker_transport_options = {"confirm_publish": True}
# Celery reads the timeout from here too (celery#9339); keep them equal.
result_backend_transport_options: dict[str, object] = {"visibility_timeout": broker_visibility_timeout}
# sentinel:// URLs (kombu's and Celery's Sentinel support) need the master's name; proj's own
# clients read the same variable (proj.stores.connection).
_sentinel_master = os.environ.get("REDIS_SENTINEL_MASTER", "mymaster")
if broker_url.startswith("sentinel://"):
    broker_transport_options["master_name"] = _sentinel_master
if result_backend.startswith("sentinel://"):
    result_backend_transport_options["master_name"] = _sentinel_master

# One reserved message per process by default; workers for short tasks raise it per queue.
worker_prefetch_multiplier = 1

# A result write that fails (Redis unreachable; with proj's backend also full or read-only) is
# retried with Celery's backoff (10 ms doubling to 10 s, jittered) for some minutes instead of
# failing a task that ran: everything accepted completes once Redis takes writes again.
result_backend_always_retry = True
result_backend_max_retries = 100

# Results are read within minutes; a day is plenty and keeps Redis from filling up.
result_expires = _env_int("RESULT_EXPIRES", 86400)
# Store task name, args and worker with the result so the dead-letter store and status can show them.
result_extended = True

# Flower and `proj status` are built on events.
worker_send_task_events = True
task_send_sent_event = True
# Report STARTED so Flower and the CLI can tell "running" from "waiting".
task_track_started = True

# Ctrl-C / SIGTERM: finish running tasks; on a cold shutdown give them this long, then requeue.
worker_soft_shutdown_timeout = float(_env_int("WORKER_SOFT_SHUTDOWN_TIMEOUT", 10))
worker_enable_soft_shutdown_on_idle = True

# A worker that loses Redis cancels running acks-late tasks: they are redelivered, and idempotent.
worker_cancel_long_running_tasks_on_connection_loss = True

# Start before Redis is up (compose, the local stack) and keep retrying.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

# Recycle a prefork child that has grown past this (KiB); the guard, not the fix, for leaks.
worker_max_memory_per_child = _env_int("WORKER_MAX_MEMORY_PER_CHILD_KB", 512_000)

# Logs in UTC so the timestamps of workers, beat and Flower line up.
enable_utc = True
timezone = "UTC"

# Periodic work (celery -A proj beat). The temp-file cleaner's age threshold is FILES_TEMP_MAX_AGE
# (proj/settings.py); how often it runs is this interval.
beat_schedule = {
    "files-clean-temp": {
        "task": "tasks.files.clean_temp_files",
        "schedule": float(_env_int("FILES_CLEAN_INTERVAL", 900)),
    },
}
