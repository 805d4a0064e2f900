"""RabbitMQ as the broker (quorum queues), results and proj's stores on Redis, through real workers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proj.integration.metrics import ProjCollector
from proj.stores.delayed import DelayedSet
from tests.conftest import EMAIL_QUEUES, smtp_env
from tests.harness import IN_CI, ROOT, WorkerProcess, free_port, run_proj, wait_for

pytestmark = [pytest.mark.integration]

CANARY = "tasks.health.canary"
SEND_EMAIL = "tasks.email.send_email"
AMQP_HOST, AMQP_PORT = "127.0.0.1", int(os.environ.get("RABBITMQ_PORT", "5672"))


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def _rabbitmq_missing() -> str | None:
    """Why the tests cannot run here, or None."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl not on PATH"
    try:
        socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=2).close()
    except OSError as exc:
        return f"no RabbitMQ at {AMQP_HOST}:{AMQP_PORT}: {exc}"
    return None


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A virtual host of its own, deleted afterwards; skip without RabbitMQ, fail in CI."""
    missing = _rabbitmq_missing()
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true and {missing}")
        pytest.skip(missing)
    name = f"proj-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="module")
def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"


@pytest.fixture(scope="module")
def amqp_app(amqp_url: str, redis_server: Any) -> Any:
    """proj's app as a process on RabbitMQ builds it: celeryconfig read afresh with the AMQP URL."""
    from proj.integration.native_delay import Celery

    # For this module's tests: Celery reads CELERY_BROKER_URL before its configuration, every time.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CELERY_BROKER_URL", amqp_url)
        spec = importlib.util.spec_from_file_location("celeryconfig_rabbitmq", ROOT / "celeryconfig.py")
        assert spec is not None and spec.loader is not None
        config = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config)
        app = Celery("proj", amqp="proj.integration.producer:AMQP", set_as_current=False)
        app.config_from_object(config)
        app.loader.override_backends = dict(config.override_backends)
        yield app
        app.close()


@pytest.fixture
def amqp_worker(
    amqp_app: Any, amqp_url: str, worker_env: dict[str, str], redis_client: Any
) -> Iterator[Callable[..., WorkerProcess]]:
    """Real `celery -A proj worker` subprocesses on RabbitMQ; every one is stopped by PID."""
    started: list[WorkerProcess] = []

    def start(queues: str, *, pool: str = "threads", concurrency: int = 4, env: dict[str, str] | None = None):
        worker = WorkerProcess(
            queues=queues,
            name=f"rmq{len(started)}-{free_port()}",
            env={**worker_env, "CELERY_BROKER_URL": amqp_url, **(env or {})},
            pool=pool,
            concurrency=concurrency,
        )
        started.append(worker)
        return worker.start(amqp_app)

    yield start
    for worker in started:
        worker.stop(signal.SIGTERM, timeout=20)


def test_every_queue_is_a_quorum_queue_with_a_delivery_limit(amqp_worker, vhost):
    amqp_worker("email,email_bulk,files,default")
    rows = json.loads(
        _rabbitmqctl("list_queues", "-p", vhost, "name", "type", "arguments", "--formatter", "json")
    )
    queues = {row["name"]: row for row in rows}
    for name in ("email", "email_bulk", "files", "default"):
        assert queues[name]["type"] == "quorum", queues[name]
        assert "x-delivery-limit" in json.dumps(queues[name]["arguments"])


def test_canary_is_delivered_and_its_result_is_in_redis(amqp_worker, amqp_app, redis_client):
    worker = amqp_worker("default", pool="solo", concurrency=1)
    result = amqp_app.send_task(CANARY)
    assert result.get(timeout=30)["hostname"] == worker.nodename
    assert redis_client.exists(f"celery-task-meta-{result.id}")


def test_an_email_is_retried_and_sent_exactly_once(amqp_worker, amqp_app, smtp_server, redis_client):
    smtp_server.handler.fail_next("451 4.3.0 Try again later")
    amqp_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    kwargs = {"to": "eve@example.com", "subject": "retry", "text": "body", "idempotency_key": "rmq:eve"}
    first = amqp_app.send_task(SEND_EMAIL, kwargs=kwargs)
    answer = first.get(timeout=40)
    assert first.retries == 1
    # The same key again: the ledger (in Redis, not the broker) answers, nothing is sent twice.
    again = amqp_app.send_task(SEND_EMAIL, kwargs=kwargs).get(timeout=30)
    assert again["message_id"] == answer["message_id"] and again["duplicate"] is True
    assert len(smtp_server.handler.received) == 1
    assert smtp_server.handler.received[0].message["Message-ID"] == answer["message_id"]


def test_a_sigkilled_workers_task_is_redelivered(amqp_worker, amqp_app):
    env = {"TASK_TIME_LIMIT": "5", "TASK_SOFT_TIME_LIMIT": "4"}
    worker = amqp_worker("default", pool="prefork", concurrency=1, env=env)
    result = amqp_app.send_task(CANARY, kwargs={"hold": 2})
    wait_for(lambda: result.state == "STARTED", timeout=20, what="the task to start")
    worker.kill()
    # RabbitMQ returns an unacknowledged message as soon as its consumer's connection closes.
    second = amqp_worker("default", pool="prefork", concurrency=1, env=env)
    assert result.get(timeout=30)["hostname"] == second.nodename


def test_a_countdown_past_the_broker_limit_waits_in_rabbitmq_not_in_a_worker(
    amqp_worker, amqp_app, redis_client, monkeypatch
):
    # Production's limit is 30 s; 1 s makes a 4 s countdown a long one.
    monkeypatch.setitem(amqp_app.conf, "broker_max_countdown", 1)
    worker = amqp_worker("default", pool="solo", concurrency=1, env={"BROKER_MAX_COUNTDOWN": "1"})
    sent = time.time()
    result = amqp_app.send_task(CANARY, countdown=4)
    assert DelayedSet(redis_client).pending() == []  # not parked in Redis: RabbitMQ holds it
    time.sleep(1)
    scheduled = amqp_app.control.inspect([worker.nodename], timeout=2).scheduled() or {}
    assert scheduled.get(worker.nodename, []) == []  # and no worker holds it unacknowledged
    answer = result.get(timeout=30)
    assert datetime.fromisoformat(answer["ran_at"]).timestamp() >= sent + 3  # whole seconds (Celery)
    # Under a second: one second (kombu refuses a delay that truncates to 0).
    assert amqp_app.send_task(CANARY, countdown=0.4).get(timeout=30)["hostname"] == worker.nodename


def test_status_reads_queue_depths_from_rabbitmq(amqp_worker, amqp_app, amqp_url, worker_env, redis_client):
    worker = amqp_worker("default", pool="solo", concurrency=1)
    worker.stop()
    amqp_app.send_task(CANARY, queue="files")  # nobody consumes files here: it waits
    env = {**worker_env, "CELERY_BROKER_URL": amqp_url}
    status = run_proj(env, "status", "--json", "--timeout", "1", timeout=60)
    report = json.loads(status.stdout)
    depths = {queue["name"]: queue["depth"] for queue in report["queues"]}
    assert depths == {"email": 0, "email_bulk": 0, "files": 1, "default": 0}, status.stderr
    # RabbitMQ keeps taken and delayed messages itself: neither is read from Redis, nor shown as 0.
    assert {(queue["unacked"], queue["parked"]) for queue in report["queues"]} == {(None, None)}
    # /metrics (proj's collector in Flower's process) reads the same depths from RabbitMQ.
    registry = CollectorRegistry()
    registry.register(ProjCollector(amqp_app, redis_client))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {s.labels["queue"]: s.value for s in families["proj_queue_messages"].samples} == depths
    assert not families["proj_queue_unacked_messages"].samples
    assert not families["proj_queue_parked_messages"].samples
    check = run_proj(env, "status", "--check", timeout=60)
    assert check.returncode == 0 and "not available" in check.stdout


def test_a_poison_message_is_dropped_after_the_delivery_limit(amqp_app):
    # What a task that kills its worker each time amounts to: the message comes back, again and again.
    queue = amqp_app.amqp.queues["email_bulk"]
    limit = queue.queue_arguments["x-delivery-limit"]
    with amqp_app.connection_for_write() as connection:
        bound = queue.bind(connection.default_channel)
        bound.declare()
        bound.purge()
        connection.Producer().publish({"poison": True}, exchange=queue.exchange, routing_key="email_bulk")
        # The first delivery and `limit` returns; the next return goes over the limit.
        for _ in range(limit + 1):
            wait_for(lambda: bound.get(no_ack=False), timeout=10, what="a delivery").reject(requeue=True)
        time.sleep(1)
        assert bound.get(no_ack=False) is None  # dropped, not delivered a (limit + 2)nd time
