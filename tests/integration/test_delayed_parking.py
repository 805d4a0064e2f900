"""Long delays wait in proj's delayed set however the message was published, not in a worker."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

pytestmark = pytest.mark.integration

CANARY = "tasks.health.canary"


def test_send_task_by_name_with_a_long_countdown_waits_in_the_delayed_set(
    start_worker, celery_app, redis_client
):
    from proj.stores.delayed import DelayedSet

    # Production parks past 30 s (BROKER_MAX_COUNTDOWN); a connection with 1 s keeps the test short.
    options = {**celery_app.conf.broker_transport_options, "park_after": 1}
    with celery_app.connection_for_write(transport_options=options) as connection:
        result = celery_app.send_task(CANARY, countdown=4, connection=connection)
    [parked] = DelayedSet(redis_client).pending()
    assert parked["id"] == result.id and parked["queue"] == "default" and parked["due"] > time.time() + 2
    assert redis_client.llen("default") == 0  # nothing a worker would hold while it waits

    start_worker("default", pool="solo", concurrency=1)
    ran_at = datetime.fromisoformat(result.get(timeout=30)["ran_at"]).timestamp()
    assert ran_at >= parked["due"] and DelayedSet(redis_client).pending() == []
