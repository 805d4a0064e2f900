"""RabbitMQ as the broker (quorum queues), results and proj's stores on Redis, through real workers."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proj.errors import DeliveryLimitExceeded
from proj.integration.metrics import ProjCollector
from proj.integration.watchdog import STALLED_EXIT_CODE
from proj.stores.deadletters import ENTRIES_KEY, DeadLetterStore
from proj.stores.delayed import DelayedSet
from proj.stores.setaside import SetAsideStore
from tests.conftest import EMAIL_QUEUES, smtp_env
from tests.harness import flower_process, run_proj, wait_for
from tests.rabbitmq import (  # noqa: F401  (the fixtures, by their names)
    AMQP_HOST,
    AMQP_PORT,
    fixture_amqp_app,
    fixture_amqp_url,
    fixture_amqp_worker,
    fixture_vhost,
    rabbitmqctl,
)

pytestmark = [pytest.mark.integration]

CANARY = "tasks.health.canary"
SEND_EMAIL = "tasks.email.send_email"


def test_every_queue_is_a_quorum_queue_with_a_delivery_limit(amqp_worker, vhost):
    amqp_worker("email,email_bulk,files,default")
    rows = json.loads(
        rabbitmqctl("list_queues", "-p", vhost, "name", "type", "arguments", "--formatter", "json")
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


def _reject_until_dead_lettered(app: Any, queue_name: str) -> int:
    """What a task that kills its worker each time amounts to: each delivery comes back, past the limit."""
    queue = app.amqp.queues[queue_name]
    limit = int(queue.queue_arguments["x-delivery-limit"])
    with app.connection_for_write() as connection:
        bound = queue.bind(connection.default_channel)
        # The first delivery and `limit` returns; the next return goes over the limit.
        for _ in range(limit + 1):
            wait_for(lambda: bound.get(no_ack=False), timeout=10, what="a delivery").reject(requeue=True)
        assert bound.get(no_ack=False) is None  # left the queue, not delivered a (limit + 2)nd time
    return limit


def _depth(vhost: str, queue: str) -> int:
    rows = json.loads(rabbitmqctl("list_queues", "-p", vhost, "name", "messages", "--formatter", "json"))
    return int({row["name"]: row["messages"] for row in rows}[queue])


def test_a_poison_message_becomes_a_dead_letter_that_replays(
    amqp_worker, amqp_app, amqp_url, worker_env, redis_client, vhost
):
    worker = amqp_worker("default", pool="solo", concurrency=1)  # workers of `default` move dead letters
    env = {**worker_env, "CELERY_BROKER_URL": amqp_url}
    poisoned = amqp_app.send_task(CANARY, kwargs={"hold": 0}, queue="email_bulk")  # no worker takes it
    limit = _reject_until_dead_lettered(amqp_app, "email_bulk")

    store = DeadLetterStore(redis_client)
    letter = wait_for(lambda: store.get(poisoned.id), timeout=30, what="the dead letter in Redis")
    assert (letter.task_name, letter.kwargs, letter.queue) == (CANARY, {"hold": 0}, "email_bulk")
    assert letter.exc_type == "DeliveryLimitExceeded"
    assert f"delivered {limit + 1} times" in letter.message and "delivery_limit" in letter.message
    assert json.loads(redis_client.hget(ENTRIES_KEY, poisoned.id))["exc_type"] == "DeliveryLimitExceeded"
    # Acknowledged once Redis had it: nothing is left in RabbitMQ's dead-letter queue.
    wait_for(lambda: _depth(vhost, "proj.dead") == 0, timeout=10, what="proj.dead to be empty")
    listed = run_proj(env, "dlq", "list", timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"{poisoned.id}\n  {CANARY} on email_bulk" in listed.stdout, listed.stdout
    assert "DeliveryLimitExceeded: delivered" in listed.stdout, listed.stdout

    replay = run_proj(env, "dlq", "replay", poisoned.id, timeout=60)
    assert replay.returncode == 0, replay.stderr
    new_id = replay.stdout.split()[-1]
    # Routed by name, as any call: the canary's own queue, which this worker consumes.
    assert amqp_app.AsyncResult(new_id).get(timeout=30)["hostname"] == worker.nodename
    assert store.get(poisoned.id).replayed_as == new_id


def test_a_task_that_kills_its_worker_each_time_ends_as_a_dead_letter(amqp_worker, amqp_app, redis_client):
    amqp_worker("default", pool="solo", concurrency=1)  # the mover
    crashing = amqp_worker("email_bulk", pool="prefork", concurrency=1)
    limit = int(amqp_app.amqp.queues["email_bulk"].queue_arguments["x-delivery-limit"])
    result = amqp_app.send_task(CANARY, kwargs={"hold": 30}, queue="email_bulk")

    def running_in() -> int | None:
        """The pid of the pool process running the task now, if one is."""
        active = amqp_app.control.inspect([crashing.nodename], timeout=1).active() or {}
        pids = [t.get("worker_pid") for t in active.get(crashing.nodename, []) if t["id"] == result.id]
        return pids[0] if pids and pids[0] else None

    killed: list[int] = []
    # The first delivery and `limit` redeliveries, each ended by the death of the process running it.
    for _ in range(limit + 1):
        pid = wait_for(lambda: (p := running_in()) not in (None, *killed) and p, timeout=30, what="a run")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    store = DeadLetterStore(redis_client)
    letter = wait_for(lambda: store.get(result.id), timeout=30, what="the dead letter in Redis")
    assert (letter.exc_type, letter.queue) == ("DeliveryLimitExceeded", "email_bulk")
    with pytest.raises(DeliveryLimitExceeded, match=f"delivered {limit + 1} times"):
        result.get(timeout=10)  # whoever waits on it hears of its end
    assert running_in() is None and crashing.proc is not None and crashing.proc.poll() is None


def test_unreadable_messages_over_the_limit_are_set_aside(amqp_worker, amqp_app, redis_client, vhost):
    amqp_worker("default", pool="solo", concurrency=1)
    queue = amqp_app.amqp.queues["email_bulk"]
    with amqp_app.connection_for_write() as connection:
        producer = connection.Producer()
        producer.publish({"poison": True}, exchange=queue.exchange, routing_key="email_bulk")
        producer.publish(
            b"\xff\xfe not utf-8",
            exchange=queue.exchange,
            routing_key="email_bulk",
            content_type="application/octet-stream",
            content_encoding="binary",
        )
    limit = int(queue.queue_arguments["x-delivery-limit"])
    with amqp_app.connection_for_write() as connection:
        bound = queue.bind(connection.default_channel)
        for _ in range(2 * (limit + 1)):
            wait_for(lambda: bound.get(no_ack=False), timeout=10, what="a delivery").reject(requeue=True)
        assert bound.get(no_ack=False) is None
    store = SetAsideStore(redis_client)
    wait_for(lambda: store.count() == 2, timeout=30, what="two set-aside messages")
    kept = [json.loads(raw) for raw in store.list()]
    bodies = {entry["properties"].get("body_encoding"): entry["body"] for entry in kept}
    assert json.loads(bodies[None]) == {"poison": True}
    assert base64.b64decode(bodies["base64"]) == b"\xff\xfe not utf-8"
    assert {entry["headers"]["x-first-death-reason"] for entry in kept} == {"delivery_limit"}
    wait_for(lambda: _depth(vhost, "proj.dead") == 0, timeout=10, what="proj.dead to be empty")


def test_an_unknown_task_is_set_aside_once(amqp_worker, amqp_app, redis_client, vhost):
    worker = amqp_worker("default", pool="solo", concurrency=1)
    amqp_app.send_task("tasks.health.no_such_task", queue="default")
    store = SetAsideStore(redis_client)
    wait_for(lambda: store.count() == 1, timeout=30, what="the set-aside copy")
    # The worker set it aside and rejected it; RabbitMQ dead-letters the rejection, and the mover
    # acknowledges that without a second copy.
    wait_for(lambda: "was rejected by a worker" in worker.log(), timeout=30, what="the mover's line")
    wait_for(lambda: _depth(vhost, "proj.dead") == 0, timeout=10, what="proj.dead to be empty")
    assert store.count() == 1
    (entry,) = [json.loads(raw) for raw in store.list()]
    assert entry["headers"]["task"] == "tasks.health.no_such_task"


class DeafProxy:
    """TCP proxy to RabbitMQ that can make a consumer deaf: RabbitMQ's frames to a connection that
    sent basic.consume are dropped from then on, while what it sends (heartbeats) still arrives.

    RabbitMQ keeps pushing deliveries into such a connection up to its prefetch; the rest wait, and
    the worker, which receives none, has free slots. Heartbeats notice it only after two missed
    intervals (Celery's broker_heartbeat, 120 s, each way): the stall the watchdog is for.
    """

    BASIC_CONSUME = b"\x00\x3c\x00\x14"  # class 60 (basic), method 20 (consume)

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.consuming: set[int] = set()  # ids of client sockets that sent basic.consume
        self.deaf = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((AMQP_HOST, AMQP_PORT))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, client), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, client: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if source is client and self.BASIC_CONSUME in data:
                    self.consuming.add(id(client))
                if source is not client and self.deaf and id(client) in self.consuming:
                    continue  # read and dropped; the socket stays open
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_a_deaf_consumer_is_noticed_by_the_watchdog_and_its_messages_come_back(amqp_worker, amqp_app, vhost):
    proxy = DeafProxy(AMQP_PORT)
    try:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"
        # Short limits: the stalled worker's shutdown cannot close its deaf connection and waits out
        # the watchdog's grace (time limit + soft shutdown + 10 s) before it exits anyway.
        env = {
            "CELERY_BROKER_URL": url,
            "PROJ_STALL_WINDOW": "6",
            "TASK_TIME_LIMIT": "5",
            "TASK_SOFT_TIME_LIMIT": "4",
            "WORKER_SOFT_SHUTDOWN_TIMEOUT": "1",
        }
        stalled = amqp_worker("default", pool="threads", concurrency=2, env=env)
        assert amqp_app.send_task(CANARY).get(timeout=30)["hostname"] == stalled.nodename
        proxy.deaf = True
        results = [amqp_app.send_task(CANARY) for _ in range(6)]
        proc = stalled.proc
        assert proc is not None
        wait_for(lambda: proc.poll() is not None, timeout=90, interval=0.2, what="the stalled worker to exit")
        log = stalled.log()
        assert proc.returncode == STALLED_EXIT_CODE, log[-3000:]
        # Two went into the deaf connection (its prefetch); four waited in the queue.
        assert re.search(r"ERROR.*Consumer stalled: queue default \(4 message\(s\) waiting", log), log[-3000:]
    finally:
        proxy.close()  # its connections close: RabbitMQ returns what the deaf worker never acknowledged
    restarted = amqp_worker("default", pool="threads", concurrency=2)
    assert {r.get(timeout=60)["hostname"] for r in results} == {restarted.nodename}


@contextlib.contextmanager
def _flower(env: dict[str, str], log: Path) -> Iterator[str]:
    """Flower as the stack runs it, with basic auth and FLOWER_BROKER_API if given; stopped by PID."""
    with flower_process(
        {**{k: v for k, v in env.items() if not k.startswith("FLOWER_")}, **_flower_env(env)}, log
    ) as url:
        yield url


def _flower_env(env: dict[str, str]) -> dict[str, str]:
    kept = {k: v for k, v in env.items() if k == "FLOWER_BROKER_API"}
    return {**kept, "FLOWER_BASIC_AUTH": "ops:flower-secret"}


def _get_with_auth(url: str) -> Any:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"ops:flower-secret").decode())
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_flower_asks_the_management_api_named_by_flower_broker_api(amqp_url, worker_env, vhost, tmp_path):
    # No management plugin on this machine's RabbitMQ: a listener records what Flower asks and
    # answers 503, which Flower takes as "no lengths".
    asked: list[tuple[str, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append((self.path, self.headers.get("Authorization", "")))
            self.send_error(503)

        def log_message(self, *args: Any) -> None:
            pass

    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    env = {**worker_env, "CELERY_BROKER_URL": amqp_url}
    try:
        given = {**env, "FLOWER_BROKER_API": f"http://mgmt:mgmt-pw@127.0.0.1:{api.server_port}/api/"}
        log = tmp_path / "flower-api.log"
        with _flower(given, log) as url:
            assert _get_with_auth(f"{url}/api/queues/length") == {"active_queues": []}
        assert asked and asked[0][0] == f"/api/queues/{vhost}", asked
        assert asked[0][1] == "Basic " + base64.b64encode(b"mgmt:mgmt-pw").decode()
        said = log.read_text(errors="replace")
        assert "FLOWER_BROKER_API" not in said and "mgmt-pw" not in said  # no notice, no password
    finally:
        api.shutdown()
        api.server_close()
    # Without it, one line at start says where the lengths come from.
    log = tmp_path / "flower-plain.log"
    with _flower(env, log):
        pass
    assert (
        "flower: queue lengths on RabbitMQ come from its management plugin's HTTP API: set "
        in log.read_text()
    )
