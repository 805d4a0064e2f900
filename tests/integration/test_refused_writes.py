"""A write Redis refuses (an ACL forbids the ack; a master without its replicas) stops the worker taking
work until Redis takes it; the worker stays up."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psutil
import pytest
import redis

from proj.mail import message_id_for
from proj.settings import Settings
from proj.stores.inflight import InflightLists
from tests.conftest import EMAIL_QUEUES, smtp_env
from tests.harness import WorkerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.layer]

CANARY = "tasks.health.canary"


def test_a_refused_ack_stops_the_worker_before_its_next_message(start_worker, celery_app, redis_client):
    worker = start_worker("default", pool="solo", concurrency=1)
    assert celery_app.send_task(CANARY).get(timeout=30)["queue"] == "default"
    # The result is stored before the ack: let that ack land before Redis starts refusing acks.
    wait_for(lambda: InflightLists(redis_client).count() == 0, timeout=10, what="the warm-up ack")

    redis_client.execute_command("ACL", "SETUSER", "default", "-lrem")  # the ack of a BLMOVE'd message
    try:
        first = celery_app.send_task(CANARY)
        assert first.get(timeout=30)["queue"] == "default"  # the task ran; its ack was refused
        second = celery_app.send_task(CANARY)
        wait_for(lambda: "Stopped taking messages" in worker.log(), timeout=30, what="the refusal logged")
        # The refused ack was read before the next take: the second message waits on its queue.
        assert second.state == "PENDING"
        assert redis_client.llen("default") == 1
    finally:
        redis_client.execute_command("ACL", "SETUSER", "default", "+lrem")

    # Redis takes the ack now: the worker takes work again; the first message is gone, not rerun.
    assert second.get(timeout=60)["queue"] == "default"
    wait_for(lambda: "taking messages again" in worker.log(), timeout=10, what="the resumption logged")
    lines = [line for line in worker.log().splitlines() if "Stopped taking messages" in line]
    assert len(lines) == 1 and "LREM (this user has no permissions" in lines[0]
    received = worker.log().count(f"[{first.id}] received")
    assert received == 1, worker.log()


def test_a_worker_waits_out_a_master_refusing_writes_and_then_finishes_its_tasks(
    start_worker, celery_app, redis_client, smtp_server
):
    """NOREPLICAS (min-replicas-to-write, no replica) on every write, and the workers' connections cut
    meanwhile: their reconnect binds are refused too. They wait, and finish everything once Redis
    takes writes again; each email is sent once."""
    env = {**smtp_env(smtp_server), "EMAIL_RATE_LIMITS": "@smtp=2/s"}  # emails still at work later
    mailer = start_worker(EMAIL_QUEUES, concurrency=2, env=env)
    solo = start_worker("default", pool="solo", concurrency=1, env=env)
    workers = [solo, mailer]
    canaries = [celery_app.send_task(CANARY, args=[0.3]) for _ in range(20)]
    keys = [f"noreplicas-{i}" for i in range(10)]
    mails = [
        celery_app.send_task(
            "tasks.email.send_email",
            kwargs={"to": f"{k}@example.com", "subject": "s", "text": "t", "idempotency_key": k},
        )
        for k in keys
    ]
    wait_for(lambda: canaries[1].ready(), timeout=30, what="the first canaries")

    redis_client.config_set("min-replicas-to-write", "1")  # no replica: every write is NOREPLICAS
    try:
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            redis_client.set("proj:test:probe", "1")
        _cut_connections_of(workers, redis_client)  # the workers reconnect and bind their queues again
        # The threads worker's consumer reconnects at once: its binds are refused and waited out.
        # The solo worker first waits out the result write of the task it runs (Celery's retries).
        wait_for(lambda: "Redis refuses the binding" in mailer.log(), timeout=30, what="a refused bind")
        wait_for(lambda: "Failed operation _store_result" in solo.log(), timeout=30, what="a refused result")
        assert all(w.proc is not None and w.proc.poll() is None for w in workers), "a worker exited"
    finally:
        redis_client.config_set("min-replicas-to-write", "0")

    states = [r.get(timeout=120, propagate=False) and r.state for r in canaries + mails]
    assert states == ["SUCCESS"] * len(states), [(r.id, r.state, r.result) for r in canaries + mails]
    inbox = Counter(m.message["Message-ID"] for m in smtp_server.handler.received)
    assert set(inbox) == {message_id_for(k, Settings()) for k in keys} and max(inbox.values()) == 1, inbox
    logs = "".join(w.log() for w in workers)
    assert all(w.proc is not None and w.proc.poll() is None for w in workers), "a worker exited"
    assert "Unrecoverable error" not in logs
    assert "Redis took the binding" in mailer.log()


def _cut_connections_of(workers: list[WorkerProcess], redis_client: Any) -> None:
    """CLIENT KILL every connection of these worker processes, and only theirs (not the test's own)."""
    port = redis_client.connection_pool.connection_kwargs["port"]
    for worker in workers:
        assert worker.proc is not None
        for conn in psutil.Process(worker.proc.pid).net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == port:
                redis_client.client_kill_filter(_type="normal", addr=f"{conn.laddr.ip}:{conn.laddr.port}")
