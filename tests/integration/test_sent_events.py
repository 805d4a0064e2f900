"""`task-sent` events of `.delay()` leave in batches (proj.celery_sent_events) and reach monitors."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration

CANARY = "tasks.health.canary"


class _Monitor:
    """What Flower does: a celery event receiver on its own connection, in a thread."""

    def __init__(self, app: Any, redis_client: Any, expected: int) -> None:
        self.events: list[dict[str, Any]] = []
        numpat = redis_client.execute_command("PUBSUB", "NUMPAT")
        self._connection = app.connection_for_read()
        self._receiver = receiver = app.events.Receiver(
            self._connection, handlers={"task-sent": self._on_sent}
        )
        self._expected = expected
        self._thread = threading.Thread(target=receiver.capture, kwargs={"timeout": 30}, daemon=True)
        self._thread.start()
        wait_for(lambda: redis_client.execute_command("PUBSUB", "NUMPAT") > numpat, what="the event receiver")

    def _on_sent(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if len(self.events) >= self._expected:
            self._receiver.should_stop = True

    def wait(self) -> list[dict[str, Any]]:
        self._thread.join(30)
        self._connection.release()
        return self.events


def test_each_delay_is_seen_sent_with_the_time_it_was_sent(celery_app, redis_client):
    monitor = _Monitor(celery_app, redis_client, expected=3)
    sent = []
    for _ in range(3):
        before = time.time()
        result = celery_app.send_task(CANARY)
        sent.append((result.id, before, time.time()))
        time.sleep(0.05)  # longer than a batch: the three leave in separate batches

    events = {e["uuid"]: e for e in monitor.wait()}
    assert sorted(events) == sorted(task_id for task_id, _, _ in sent)
    for task_id, before, after in sent:
        event = events[task_id]
        assert event["name"] == CANARY and event["queue"] == "default"
        assert before <= event["timestamp"] <= after  # when .delay() ran, not when the batch left


def test_a_burst_of_delays_loses_no_event(celery_app, redis_client):
    n = 300  # more than one batch of BUFFER_LIMIT
    monitor = _Monitor(celery_app, redis_client, expected=n)
    ids = [celery_app.send_task(CANARY).id for _ in range(n)]
    seen = [e["uuid"] for e in monitor.wait()]
    assert sorted(seen) == sorted(ids)


def test_a_forked_child_sends_its_own_events(celery_app, redis_client):
    celery_app.send_task(CANARY)  # the parent's sender thread and connection exist before the fork
    celery_app.amqp._event_dispatcher.flush()  # and its event has left before the monitor listens
    monitor = _Monitor(celery_app, redis_client, expected=1)
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
    assert [e["uuid"] for e in monitor.wait()] == [child_task]
