"""The baseline: a naive Celery app with every default left alone.

Prefork pool with concurrency = cores, prefetch multiplier 4, acks early, results stored, STARTED
not tracked, no task events, mingle/gossip/heartbeat on: what `Celery(broker=..., backend=...)`
plus `celery -A app worker` gives you. Only the broker and backend URL are set.
"""

from __future__ import annotations

import os

from celery import Celery

_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("stock", broker=_url, backend=_url)


@app.task
def noop() -> None:
    """The shortest task there is (the body of every benchmark task: bench/_projtasks.py, bench/_huey.py)."""


@app.task(ignore_result=True)
def noop_ignored() -> None:
    """`noop` with its result ignored (no result, so no STARTED either)."""
