"""proj's Redis result backend (proj.integration.result_backend) against a real Redis and a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from celery import states
from kombu.utils.uuid import uuid

from proj.integration.result_backend import RECHECK_AFTER, RedisBackend
from tests.harness import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.stock_too]

CANARY = "tasks.health.canary"


def _commands(redis_client) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats; a script's commands count)."""
    stats = redis_client.info("commandstats")
    return {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}


@pytest.mark.layer
def test_the_app_uses_proj_backend_for_redis_urls(celery_app):
    assert isinstance(celery_app.backend, RedisBackend)


@pytest.mark.layer
def test_a_round_trip_through_a_real_worker_reads_no_result_with_get(start_worker, celery_app, redis_client):
    start_worker("default")
    celery_app.send_task(CANARY).get(timeout=30)  # connections and subscriptions warm
    before = _commands(redis_client)
    answers = [celery_app.send_task(CANARY).get(timeout=30) for _ in range(20)]
    after = _commands(redis_client)

    assert all(a["queue"] == "default" for a in answers)
    scripts = after.get("evalsha", 0) - before.get("evalsha", 0)
    gets = after.get("get", 0) - before.get("get", 0)
    # The worker stored STARTED and SUCCESS of each task with one script call each, the script's
    # GET being the only one: the caller waited on the published result without reading it first.
    # Celery's backend: a GET + a MULTI/SET/PUBLISH per store, and a GET per .get() (60 GETs).
    # Other scripts run on timers meanwhile (the delayed-set release every second, lease renewals,
    # sweeps) and none of them GETs: on a slow machine they add script calls, never GETs.
    assert gets == 2 * 20
    assert scripts >= gets


def test_a_stored_success_is_never_overwritten(celery_app, redis_client):
    backend = celery_app.backend
    task_id = uuid()
    backend.store_result(task_id, {"n": 1}, states.SUCCESS)
    backend.store_result(task_id, None, states.FAILURE, traceback="late duplicate")  # a redelivered copy

    stored = json.loads(redis_client.get(f"celery-task-meta-{task_id}"))
    assert stored["status"] == states.SUCCESS and stored["result"] == {"n": 1}
    assert 0 < redis_client.ttl(f"celery-task-meta-{task_id}") <= celery_app.conf.result_expires


def test_a_success_written_with_another_key_order_is_kept_too(celery_app, redis_client):
    # The script reads the status from the start of Celery's JSON, and decodes anything else.
    key = f"celery-task-meta-{uuid()}"
    redis_client.set(key, json.dumps({"result": 1, "task_id": key[17:], "status": states.SUCCESS}))
    celery_app.backend.store_result(key[17:], 2, states.FAILURE)
    assert json.loads(redis_client.get(key))["result"] == 1


def test_other_states_are_replaced_and_published(celery_app, redis_client):
    backend = celery_app.backend
    task_id = uuid()
    key = f"celery-task-meta-{task_id}"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    backend.store_result(task_id, {"done": 1}, states.STARTED)
    backend.store_result(task_id, 7, states.SUCCESS)

    published = []
    deadline = time.monotonic() + 10
    while len(published) < 2 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message:
            published.append(json.loads(message["data"])["status"])
    pubsub.close()
    assert published == [states.STARTED, states.SUCCESS]
    assert json.loads(redis_client.get(key))["result"] == 7


def test_a_result_published_before_its_subscription_is_still_found(celery_app, redis_client):
    # The race the skipped GET leaves: the result was stored and published before the caller's
    # subscription reached Redis. The caller finds it with its one GET after RECHECK_AFTER.
    backend = celery_app.backend
    task_id = uuid()
    backend.store_result(task_id, "early", states.SUCCESS)
    backend.on_task_call(None, task_id)  # subscribes now and marks it subscribed-before-publish
    assert celery_app.AsyncResult(task_id).get(timeout=RECHECK_AFTER + 10) == "early"


def test_finished_results_are_unsubscribed_at_once(start_worker, celery_app, redis_client):
    start_worker("default")
    for _ in range(20):
        result = celery_app.send_task(CANARY)
        result.get(timeout=30)
        # As Celery does: once a result has arrived its channel is no longer subscribed.
        assert redis_client.pubsub_numsub(f"celery-task-meta-{result.id}")[0][1] == 0


def test_results_waited_for_from_many_threads_leave_no_subscription(start_worker, celery_app, redis_client):
    start_worker("default", pool="solo", concurrency=1)
    for _ in range(5):
        results = [celery_app.send_task(CANARY) for _ in range(20)]
        threads = [threading.Thread(target=result.get, kwargs={"timeout": 30}) for result in results]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert all(result.state == "SUCCESS" for result in results)
        # A thread that drained another's result cancelled its subscription; the other's .get()
        # subscribed again, and must read the stored result and cancel that subscription too.
        subscribed = [r.id for r in results if redis_client.pubsub_numsub(f"celery-task-meta-{r.id}")[0][1]]
        assert subscribed == []


def _compressing_backend(celery_app) -> RedisBackend:
    backend = RedisBackend(app=celery_app, url=celery_app.conf.result_backend)
    backend.compression = "zlib"
    return backend


def test_a_compressed_success_is_never_overwritten(celery_app, redis_client):
    task_id = uuid()
    _compressing_backend(celery_app).store_result(task_id, {"n": 1}, states.SUCCESS)
    celery_app.backend.store_result(task_id, None, states.STARTED)  # an uncompressing, late duplicate
    _compressing_backend(celery_app).store_result(task_id, None, states.FAILURE, traceback="late")

    raw = redis_client.get(f"celery-task-meta-{task_id}")
    assert not raw.startswith(b"{")  # still the compressed SUCCESS
    assert celery_app.AsyncResult(task_id).get(timeout=10) == {"n": 1}


def test_a_result_published_while_the_subscription_was_cut_arrives(start_worker, celery_app, redis_client):
    start_worker("default")
    celery_app.send_task(CANARY).get(timeout=30)
    result = celery_app.send_task(CANARY, kwargs={"hold": 2})
    # The caller's pub/sub connection drops while the task runs (a network cut, a proxy restart):
    # the published result never reaches it, and this .get() skipped its first read.
    host, port = celery_app.backend.result_consumer._pubsub.connection._sock.getsockname()[:2]
    assert redis_client.client_kill_filter(addr=f"{host}:{port}") == 1
    assert result.get(timeout=30)["queue"] == "default"


@pytest.mark.layer
@pytest.mark.parametrize("backend_variable", ["set", "unset"])
def test_a_process_whose_first_call_is_a_get_uses_proj_backend(backend_variable, celery_app, worker_env):
    task_id = uuid()
    celery_app.backend.store_result(task_id, "stored", states.SUCCESS)
    env = dict(worker_env)
    if backend_variable == "unset":
        env.pop("CELERY_RESULT_BACKEND")  # REDIS_URL still names the same Redis
    code = (
        "from proj.celery import app\n"
        f"value = app.AsyncResult({task_id!r}).get(timeout=10)\n"
        "print(type(app.backend).__module__, value)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.split() == ["proj.integration.result_backend", "stored"], proc.stderr
