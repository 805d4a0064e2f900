"""Long delays wait in proj's delayed set however the message was published, not in a worker."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from celery import chain, group

pytestmark = [pytest.mark.integration, pytest.mark.stock_too]

CANARY = "tasks.health.canary"


def _publish(how: str, celery_app):
    from proj.integration.enqueue_many import enqueue_many

    canary = celery_app.signature(CANARY, countdown=4)
    if how == "send_task":
        return celery_app.send_task(CANARY, countdown=4)
    if how == "signature":
        return canary.apply_async(countdown=4)
    if how == "chain":
        return chain(canary, celery_app.signature(CANARY, immutable=True)).apply_async()
    if how == "group":
        return group([canary]).apply_async().results[0]
    [result] = enqueue_many([canary], app=celery_app)
    return result


@pytest.mark.parametrize("how", ["send_task", "signature", "chain", "group", "enqueue_many"])
def test_a_long_countdown_waits_in_the_delayed_set_however_it_is_published(
    how, start_worker, celery_app, redis_client, monkeypatch
):
    from proj.stores.delayed import DelayedSet

    # Production parks past 30 s (BROKER_MAX_COUNTDOWN); 1 s keeps the test short.
    monkeypatch.setitem(celery_app.conf, "broker_max_countdown", 1)
    result = _publish(how, celery_app)
    [parked] = DelayedSet(redis_client).pending()
    assert parked["task"] == CANARY and parked["queue"] == "default" and parked["due"] > time.time() + 2
    assert redis_client.llen("default") == 0  # nothing a worker would hold while it waits

    start_worker("default", pool="solo", concurrency=1)
    answer = result.get(timeout=30)
    ran_at = datetime.fromisoformat(answer["ran_at"]).timestamp()
    assert ran_at >= parked["due"] and DelayedSet(redis_client).pending() == []


def test_a_short_countdown_stays_in_the_broker(celery_app, redis_client, monkeypatch):
    from proj.stores.delayed import DelayedSet

    monkeypatch.setitem(celery_app.conf, "broker_max_countdown", 30)
    celery_app.send_task(CANARY, countdown=4)
    assert DelayedSet(redis_client).pending() == [] and redis_client.llen("default") == 1
