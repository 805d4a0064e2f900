"""Bench only: turn off some of proj's three replacements of Celery/kombu, the others staying on.

`PROJ_BENCH_WITHOUT` names them, comma-separated: `transport` (proj.integration.kombu_transport:
kombu's own Redis transport instead), `backend` (proj.integration.result_backend: Celery's own Redis
result backend), `events` (proj.integration.task_events: Celery's per-turn flush).
Workers load this module with `-I bench._without`, and bench._producer imports it before the app is
used, so caller and workers run the same code. Only the benchmark sets this variable: proj's one
user-facing switch is PROJ_STOCK_CELERY, which turns all three off.

`backend` is selected through the result backend URL (`env()` below), which celeryconfig reads
before any backend exists; the other two are changed here, before the worker connects or
builds its consumer, and before a caller's first publish.
"""

from __future__ import annotations

import os

from proj.celery import app
from proj.integration.task_events import BatchedTaskEvents

REPLACEMENTS = ("transport", "backend", "events")
WITHOUT = frozenset(filter(None, os.environ.get("PROJ_BENCH_WITHOUT", "").split(",")))
CELERY_BACKEND = "celery.backends.redis:RedisBackend+"


def env(names: tuple[str, ...], redis_url: str) -> dict[str, str]:
    """The environment of the workers and the caller of a run without `names`."""
    unknown = set(names) - set(REPLACEMENTS)
    if unknown:
        raise ValueError(f"unknown replacements: {sorted(unknown)}")
    extra = {"PROJ_BENCH_WITHOUT": ",".join(names)}
    if "backend" in names:
        extra["CELERY_RESULT_BACKEND"] = CELERY_BACKEND + redis_url
    return extra


unknown = WITHOUT - set(REPLACEMENTS)
if unknown:
    raise ValueError(f"PROJ_BENCH_WITHOUT: unknown replacements {sorted(unknown)}")
if "backend" in WITHOUT and not app.conf.result_backend.startswith(CELERY_BACKEND):
    raise RuntimeError("PROJ_BENCH_WITHOUT=backend needs CELERY_RESULT_BACKEND from bench._without.env()")
if "transport" in WITHOUT:
    app.conf.broker_transport = None
if "events" in WITHOUT:
    app.steps["consumer"].discard(BatchedTaskEvents)
