"""`task-sent` events of `.delay()` leave in batches (proj.celery_sent_events) and reach monitors."""

from __future__ import annotations

import os
import time

import pytest

from tests.harness import EventMonitor

pytestmark = pytest.mark.integration

CANARY = "tasks.health.canary"


def test_each_delay_is_seen_sent_with_the_time_it_was_sent(celery_app, redis_client):
    monitor = EventMonitor(celery_app, redis_client)
    sent = []
    for _ in range(3):
        before = time.time()
        result = celery_app.send_task(CANARY)
        sent.append((result.id, before, time.time()))
        time.sleep(0.05)  # longer than a batch: the three leave in separate batches

    received = monitor.events_for([task_id for task_id, _, _ in sent])
    events = {e["uuid"]: e for e in received}
    assert len(received) == len(events) == 3
    for task_id, before, after in sent:
        event = events[task_id]
        assert event["name"] == CANARY and event["queue"] == "default"
        assert before <= event["timestamp"] <= after  # when .delay() ran, not when the batch left


def test_a_burst_of_delays_loses_no_event(celery_app, redis_client):
    n = 300  # more than one batch of BUFFER_LIMIT
    monitor = EventMonitor(celery_app, redis_client)
    ids = [celery_app.send_task(CANARY).id for _ in range(n)]
    assert sorted(e["uuid"] for e in monitor.events_for(ids)) == sorted(ids)  # each once


def test_a_forked_child_sends_its_own_events(celery_app, redis_client):
    celery_app.send_task(CANARY)  # the parent's sender thread and connection exist before the fork
    monitor = EventMonitor(celery_app, redis_client)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as a prefork pool process would, it publishes a task, then lives on
        try:
            task_id = celery_app.send_task(CANARY).id
            os.write(write, task_id.encode())
            time.sleep(1)
        finally:
            os._exit(0)
    os.close(write)
    child_task = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert [e["uuid"] for e in monitor.events_for([child_task])] == [child_task]
