"""proj.bulk.enqueue_many: many tasks in pipelined batches, each run once by a real worker."""

from __future__ import annotations

import json
import threading

import pytest

from proj.bulk import enqueue_many
from tests.harness import wait_for

pytestmark = pytest.mark.integration

CANARY = "tasks.health.canary"


def test_every_task_runs_exactly_once_on_a_real_worker(start_worker, celery_app, redis_client):
    worker = start_worker("default", concurrency=4)
    n = 250
    # batch_size below n: several pipelines, so the batch boundaries are exercised too.
    results = enqueue_many([celery_app.signature(CANARY) for _ in range(n)], batch_size=64)

    assert len({r.id for r in results}) == n
    answers = [r.get(timeout=30) for r in results]
    assert {a["hostname"] for a in answers} == {worker.nodename}
    assert {a["queue"] for a in answers} == {"default"}
    stats = celery_app.control.inspect(destination=[worker.nodename], timeout=5).stats()
    assert stats[worker.nodename]["total"] == {CANARY: n}  # none ran twice
    assert redis_client.llen("default") == 0 and redis_client.hlen("unacked") == 0


def test_routing_and_headers_are_those_of_delay(celery_app, redis_client):
    mail = celery_app.signature("tasks.email.send_email", kwargs={"to": "a@example.com", "subject": "s"})
    enqueue_many([mail, celery_app.signature(CANARY)])
    # No worker runs: each message waits on the queue its route names, as .delay() would put it.
    assert redis_client.llen("email") == 1 and redis_client.llen("default") == 1
    queued = json.loads(redis_client.lindex("email", 0))
    delayed = celery_app.send_task("tasks.email.send_email", kwargs={"to": "a@example.com", "subject": "s"})
    by_delay = json.loads(redis_client.lindex("email", 0))
    assert by_delay["headers"]["id"] == delayed.id
    assert set(queued["headers"]) == set(by_delay["headers"])
    assert queued["properties"]["delivery_info"] == by_delay["properties"]["delivery_info"]


def test_task_sent_events_reach_monitors(celery_app, redis_client):
    seen: list[str] = []
    numpat = redis_client.execute_command("PUBSUB", "NUMPAT")
    with celery_app.connection_for_read() as connection:
        handlers = {"task-sent": lambda event: seen.append(event["uuid"])}
        receiver = celery_app.events.Receiver(connection, handlers=handlers)
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": 3, "timeout": 30}, daemon=True)
        thread.start()
        wait_for(lambda: redis_client.execute_command("PUBSUB", "NUMPAT") > numpat, what="the event receiver")
        results = enqueue_many([celery_app.signature(CANARY) for _ in range(3)])
        thread.join(30)
    assert sorted(seen) == sorted(r.id for r in results)


def test_a_long_countdown_is_parked_outside_the_broker_as_with_delay(celery_app, redis_client):
    mail = celery_app.signature(
        "tasks.email.send_email", kwargs={"to": "a@example.com", "subject": "s"}, countdown=3600
    )
    [result] = enqueue_many([mail, celery_app.signature(CANARY)])[:1]
    assert redis_client.llen("email") == 0 and redis_client.llen("default") == 1
    parked = [json.loads(member) for member in redis_client.zrange("proj:delayed", 0, -1)]
    assert [json.loads(p["m"])["headers"]["id"] for p in parked] == [result.id]


def test_nothing_to_enqueue_is_a_no_op(celery_app):
    assert enqueue_many([]) == []
