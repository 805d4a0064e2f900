"""The foundation through real worker subprocesses: queues, routing, shutdown, JSON only, dead letters."""

from __future__ import annotations

import json
import pickle
import signal
import uuid

import pytest

from proj.stores.deadletters import DeadLetterStore
from tests.harness import run_proj, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.stock_too]

CANARY = "tasks.health.canary"


@pytest.mark.parametrize("queue", ["email", "email_bulk", "files", "default"])
def test_canary_answers_on_each_queue(start_worker, celery_app, queue):
    pool = "prefork" if queue == "files" else "threads"
    worker = start_worker(queue, pool=pool, concurrency=1)
    result = celery_app.send_task(CANARY, queue=queue).get(timeout=30)
    assert result["hostname"] == worker.nodename
    assert result["queue"] == queue


def test_files_worker_leaves_email_tasks_in_redis(start_worker, celery_app, redis_client):
    start_worker("files", pool="prefork", concurrency=1)
    waiting = celery_app.send_task(CANARY, queue="email")
    done = celery_app.send_task(CANARY, queue="files").get(timeout=30)
    assert done["queue"] == "files"
    assert redis_client.llen("email") == 1
    assert json.loads(redis_client.lindex("email", 0))["headers"]["id"] == waiting.id
    assert waiting.state == "PENDING"


def test_sigterm_lets_the_running_task_finish_and_loses_nothing(start_worker, celery_app, redis_client):
    worker = start_worker("default", pool="prefork", concurrency=1)
    running = celery_app.send_task(CANARY, kwargs={"hold": 3})
    wait_for(lambda: running.state == "STARTED", timeout=20, what="the held task to start")
    queued = [celery_app.send_task(CANARY) for _ in range(3)]

    assert worker.stop(signal.SIGTERM, timeout=40) == 0
    assert running.state == "SUCCESS"
    assert "Warm shutdown" in worker.log() or "warm shutdown" in worker.log().lower()

    # Whatever the worker had not started is back in Redis and runs on the next worker.
    start_worker("default", concurrency=2)
    for result in queued:
        assert result.get(timeout=30)["queue"] == "default"


def test_sigkill_mid_task_redelivers_it(start_worker, celery_app, redis_server):
    env = {
        "BROKER_VISIBILITY_TIMEOUT": "5",
        "TASK_TIME_LIMIT": "3",
        "TASK_SOFT_TIME_LIMIT": "2",
        "BROKER_MAX_COUNTDOWN": "1",
        "BROKER_RESTORE_INTERVAL": "1",
        "BROKER_INFLIGHT_LEASE": "3",
    }
    worker = start_worker("default", pool="prefork", concurrency=1, env=env)
    result = celery_app.send_task(CANARY, kwargs={"hold": 1.5})
    wait_for(lambda: result.state == "STARTED", timeout=20, what="the task to start")
    worker.kill()
    # The message was never acked: after the visibility timeout a new worker gets it again.
    start_worker("default", pool="prefork", concurrency=1, env=env)
    assert result.get(timeout=40)["queue"] == "default"


def test_a_pickle_message_is_refused_and_the_worker_stays_up(start_worker, celery_app, redis_client):
    worker = start_worker("default", concurrency=1)
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    with celery_app.producer_or_acquire() as producer:
        producer.publish(
            body,
            routing_key="default",
            exchange="proj",
            serializer=None,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"id": task_id, "task": CANARY, "lang": "py", "argsrepr": "()", "kwargsrepr": "{}"},
        )
    wait_for(
        lambda: "deserialize untrusted content of type pickle" in worker.log(),
        timeout=20,
        what="the refusal in the log",
    )
    assert celery_app.AsyncResult(task_id).state == "PENDING"  # never ran
    assert celery_app.send_task(CANARY).get(timeout=20)["queue"] == "default"


def test_unknown_arguments_fail_permanently_into_dead_letters(start_worker, celery_app, redis_client):
    start_worker("default", concurrency=1)
    result = celery_app.send_task(CANARY, kwargs={"holdd": 1})
    with pytest.raises(TypeError, match="holdd"):
        result.get(timeout=20)
    # Celery stores the FAILURE result before it sends task_failure, so the letter can trail .get().
    letters = wait_for(lambda: DeadLetterStore(redis_client).list(), timeout=10, what="the dead letter")
    assert [(d.task_id, d.task_name, d.kwargs, d.exc_type) for d in letters] == [
        (result.id, CANARY, {"holdd": 1}, "TypeError")
    ]
    assert "holdd" in letters[0].message and "Traceback" in letters[0].traceback
    assert celery_app.send_task(CANARY).get(timeout=20)["queue"] == "default"  # worker still up


def test_dlq_replay_from_the_cli_runs_the_task_again(start_worker, celery_app, redis_client, worker_env):
    from proj.stores.deadletters import DeadLetter

    store = DeadLetterStore(redis_client)
    store.record(
        DeadLetter(
            task_id="dead-1",
            task_name=CANARY,
            kwargs={"hold": 0},
            queue="default",
            exc_type="TransientError",
            message="gave up",
        )
    )
    listed = run_proj(worker_env, "dlq", "list", timeout=60)
    assert "dead-1" in listed.stdout and "gave up" in listed.stdout
    start_worker("default", concurrency=1)
    replay = run_proj(worker_env, "dlq", "replay", "dead-1", timeout=60)
    assert replay.returncode == 0, replay.stderr
    new_id = replay.stdout.strip().split()[-1]
    assert celery_app.AsyncResult(new_id).get(timeout=20)["queue"] == "default"
    assert store.count() == 0
