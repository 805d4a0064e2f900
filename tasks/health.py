"""Health probes that travel the same path as real work."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Any

from proj.celery import app


@app.task(ignore_result=False, acks_late=False)
def canary() -> dict[str, Any]:
    """Answer with the worker's hostname and the time the task ran, proving a queue is consumed."""
    return {
        "hostname": canary.request.hostname or socket.gethostname(),
        "ran_at": datetime.now(UTC).isoformat(),
        "queue": (canary.request.delivery_info or {}).get("routing_key"),
    }
