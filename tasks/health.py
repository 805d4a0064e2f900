"""Health probes that travel the same path as real work."""

from __future__ import annotations

import math
import socket
import time
from datetime import UTC, datetime
from typing import Any

from proj.celery import app
from proj.errors import PermanentError

MAX_HOLD_SECONDS = 60.0


@app.task(ignore_result=False)
def canary(hold: float = 0.0) -> dict[str, Any]:
    """Answer with the worker's hostname and the time the task ran, proving a queue is consumed.

    `hold` keeps the worker slot busy for that many seconds (at most a minute): shutdown drills use it.
    """
    # JSON carries NaN and huge numbers as well as any other type: refuse them clearly, never retry.
    if isinstance(hold, bool) or not isinstance(hold, int | float) or math.isnan(hold):
        raise PermanentError(f"canary: hold must be a number of seconds, got {type(hold).__name__}")
    time.sleep(min(max(float(hold), 0.0), MAX_HOLD_SECONDS))
    return {
        "hostname": canary.request.hostname or socket.gethostname(),
        "ran_at": datetime.now(UTC).isoformat(),
        "queue": (canary.request.delivery_info or {}).get("routing_key"),
    }
