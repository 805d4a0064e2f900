"""The baseline: a naive Celery app with every default left alone.

Prefork pool with concurrency = cores, prefetch multiplier 4, acks early, results stored, no task
events, mingle/gossip/heartbeat on, INFO-free WARNING logging: what `Celery(broker=..., backend=...)`
plus `celery -A app worker` gives you. Only the broker and backend URL are set.
"""

from __future__ import annotations

import os

from celery import Celery

_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("stock", broker=_url, backend=_url)


@app.task
def noop() -> None:
    """The shortest task there is."""
