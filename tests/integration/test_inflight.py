"""A worker of one queue takes each message into its own inflight list (BLMOVE), kept under a lease."""

from __future__ import annotations

import json
import signal

import pytest
import redis

from proj.integration.kombu_transport import UNREADABLE_KEY
from proj.stores.inflight import LEASES_KEY, REGISTRY_KEY, InflightLists
from tests.faults.scenario import runs_by_id
from tests.harness import EventMonitor, run_proj, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.layer]

CANARY = "tasks.health.canary"
# Short leases and sweeps so that the tests see them run out (renewed every second: slack for a
# loaded CI machine); the long task below lasts several leases.
LEASE_ENV = {"BROKER_INFLIGHT_LEASE": "3", "BROKER_RESTORE_INTERVAL": "1"}


def _registered(client: redis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(REGISTRY_KEY).items()}


def test_a_running_task_is_in_its_workers_inflight_list_and_leaves_it_when_done(
    start_worker, celery_app, redis_client, worker_env
):
    start_worker("default", pool="solo", concurrency=1, env=LEASE_ENV)
    result = celery_app.send_task(CANARY, kwargs={"hold": 6})
    wait_for(lambda: result.state == "STARTED", timeout=20, what="the task to start")

    (inflight, queue), *others = _registered(redis_client).items()
    assert queue == "default" and not others
    assert [json.loads(m)["headers"]["id"] for m in redis_client.lrange(inflight, 0, -1)] == [result.id]
    assert redis_client.llen("default") == 0 and redis_client.hlen("unacked") == 0
    status = run_proj(worker_env, "status", "--json", "--timeout", "1", timeout=60)
    assert json.loads(status.stdout)["unacked"] == 1

    assert result.get(timeout=20)["queue"] == "default"
    wait_for(lambda: redis_client.llen(inflight) == 0, timeout=10, what="the ack (LREM)")
    assert redis_client.llen("default") == 0


def test_a_task_outliving_the_lease_is_not_requeued_while_its_worker_lives(
    start_worker, celery_app, redis_client
):
    monitor = EventMonitor(celery_app, redis_client, kind="task-received")
    for _ in range(2):  # whichever is idle sweeps for expired leases every second
        start_worker("default", pool="solo", concurrency=1, env=LEASE_ENV)
    long = celery_app.send_task(CANARY, kwargs={"hold": 10})  # three leases and more
    assert long.get(timeout=30)["queue"] == "default"
    after = celery_app.send_task(CANARY)  # its event arrives after any duplicate of the long one
    after.get(timeout=20)

    received = monitor.events_for([long.id, after.id])
    assert [e["uuid"] for e in received].count(long.id) == 1
    assert redis_client.llen("default") == 0


def test_a_killed_workers_task_comes_back_after_its_lease(start_worker, celery_app, redis_client):
    doomed = start_worker("default", pool="solo", concurrency=1, env=LEASE_ENV)
    result = celery_app.send_task(CANARY, kwargs={"hold": 5})
    wait_for(lambda: result.state == "STARTED", timeout=20, what="the task to start")
    (doomed_list,) = _registered(redis_client)
    doomed.kill()

    # Its lease runs out, a sweep puts the message back, and another worker runs the task.
    survivor = start_worker("default", pool="solo", concurrency=1, env=LEASE_ENV)
    assert result.get(timeout=40)["hostname"] == survivor.nodename
    assert doomed_list not in _registered(redis_client) and not redis_client.exists(doomed_list)


def test_countdown_messages_held_past_a_lost_lease_run_once(start_worker, celery_app, redis_client):
    # A worker holds countdown messages in memory, taken into its inflight list. Its lease runs out
    # while it lives (cut off, frozen) and a sweep puts them back on the queue: it must drop its
    # copies, else it runs each once from memory and once more from the queue. A lease of 10 s (not
    # 3): on a loaded machine a 3 s lease can also run out by itself before the sweep below.
    worker = start_worker(
        "default", pool="solo", concurrency=1, env={**LEASE_ENV, "BROKER_INFLIGHT_LEASE": "10"}
    )
    held = celery_app.send_task(CANARY, countdown=15)
    wait_for(lambda: f"[{held.id}] received" in worker.log(), timeout=20, what="the countdown task received")
    (inflight,) = [n for n in _registered(redis_client) if redis_client.llen(n)]

    assert InflightLists(redis_client).requeue([inflight]) == 1  # what the sweep does after the lease
    later = celery_app.send_task(CANARY, countdown=18)  # due after any copy of the first one

    assert later.get(timeout=60)["queue"] == "default" and held.state == "SUCCESS"
    assert runs_by_id(worker.log()).get(held.id) == 1, worker.log()[-3000:]
    assert "LeaseLostError" in worker.log()  # it reconnected: the path under test ran
    assert redis_client.llen("default") == 0
    wait_for(
        lambda: sum(redis_client.llen(name) for name in _registered(redis_client)) == 0,
        timeout=10,
        what=f"the acks (LREM): {[redis_client.lrange(n, 0, -1) for n in _registered(redis_client)]}",
    )


def test_a_warm_shutdown_gives_back_what_it_took_and_unregisters(start_worker, celery_app, redis_client):
    worker = start_worker("default", pool="solo", concurrency=1, env=LEASE_ENV)
    running = celery_app.send_task(CANARY, kwargs={"hold": 2})
    wait_for(lambda: running.state == "STARTED", timeout=20, what="the task to start")
    assert len(_registered(redis_client)) == 1

    assert worker.stop(signal.SIGTERM, timeout=40) == 0
    assert running.state == "SUCCESS"
    assert _registered(redis_client) == {} and redis_client.zcard(LEASES_KEY) == 0


def test_something_that_is_not_a_message_is_set_aside_and_the_worker_goes_on(
    start_worker, celery_app, redis_client
):
    start_worker("default", pool="solo", concurrency=1, env=LEASE_ENV)
    redis_client.lpush("default", b"not json at all", b'{"no": "properties"}')

    assert celery_app.send_task(CANARY).get(timeout=20)["queue"] == "default"
    wait_for(lambda: redis_client.llen(UNREADABLE_KEY) == 2, timeout=10, what="both set aside")
    assert sorted(redis_client.lrange(UNREADABLE_KEY, 0, -1)) == [b"not json at all", b'{"no": "properties"}']
    (inflight,) = _registered(redis_client)
    wait_for(lambda: redis_client.llen(inflight) == 0, timeout=10, what="the canary's ack (LREM)")
    assert redis_client.llen("default") == 0


def test_requeue_of_expired_lists_keeps_the_queue_order(redis_client):
    lists = InflightLists(redis_client)
    redis_client.lpush("q", "m1", "m2", "m3")  # kombu pushes on the left and takes from the right
    lists.hold({"inflight.a": "q"}, lease=60)
    lists.hold({"inflight.b": "q"}, lease=0)  # ended at once: its owner is gone
    for name in ("inflight.a", "inflight.b", "inflight.b"):
        redis_client.blmove("q", name, 1, "RIGHT", "LEFT")

    assert lists.requeue_expired() == 2
    assert [redis_client.rpop("q") for _ in range(3)] == [b"m2", b"m3", None]
    assert _registered(redis_client) == {"inflight.a": "q"} and redis_client.llen("inflight.a") == 1
    assert lists.renew(["inflight.a", "inflight.b"], lease=60) == ["inflight.b"]
    assert lists.count() == 1
