"""Redis restarted (AOF everysec, 5 s down) under 3,000 default tasks and 400 emails in flight.

At the restart Redis holds every kind of state proj keeps: queued messages, inflight lists and their
leases (the default workers take with BLMOVE), unacked records (the email workers consume two
queues), parked delays and ledger claims. Workers must come back by themselves, lose nothing, and
no process may run a task again because its own connection went away.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from proj.mail import message_id_for
from proj.settings import Settings
from proj.stores.delayed import DelayedSet
from proj.stores.inflight import InflightLists
from tests.conftest import smtp_env
from tests.faults.scenario import Outcome, report, runs_by_id, scaled
from tests.harness import RedisServer, WorkerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

DOWN_FOR = 5.0
PARK_AFTER = 31  # seconds: longer than celeryconfig's broker_max_countdown (30), so parked in Redis


@pytest.mark.timeout(420)
def test_redis_restart_under_load_loses_nothing_and_workers_resume(worker_env, smtp_server, monkeypatch):
    from celery import Celery

    server = RedisServer().start("--appendonly", "yes", "--appendfsync", "everysec")
    url = server.url
    env = {
        **worker_env,
        **smtp_env(smtp_server),
        "REDIS_URL": url,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "BROKER_RESTORE_INTERVAL": "1",
    }
    # An app of its own on this Redis, so the session's app is not disturbed by the restart
    # (Celery reads CELERY_BROKER_URL before its configuration); proj's producer parks long delays.
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", url)
    app = Celery("restart", amqp="proj.integration.producer:AMQP", task_cls="proj.integration.requeue:Task")
    app.config_from_object("celeryconfig")
    workers = [
        WorkerProcess(queues="default", name=f"restart-default-{i}", env=env, pool="solo", concurrency=1)
        for i in range(2)
    ] + [WorkerProcess(queues="email,email_bulk", name=f"restart-email-{i}", env=env) for i in range(2)]
    client = server.client()
    try:
        for worker in workers:
            worker.start(app)
        defaults, emails = scaled(3000), scaled(400)
        parked = [app.send_task("tasks.health.canary", countdown=PARK_AFTER) for _ in range(scaled(50))]
        # 5 ms each, so that the restart finds them running, taken and queued
        canaries = [app.send_task("tasks.health.canary", args=[0.005]) for _ in range(defaults)]
        keys = [f"restart-{i}" for i in range(emails)]
        mails = [
            app.send_task(
                "tasks.email.send_email",
                kwargs={"to": f"r{i}@example.com", "subject": "s", "text": "t", "idempotency_key": k},
            )
            for i, k in enumerate(keys)
        ]
        wait_for(
            lambda: len(smtp_server.handler.received) >= emails // 5, timeout=120, what="a fifth of the mail"
        )
        held = {
            "queued": client.llen("default") + client.llen("email"),
            "inflight": InflightLists(client).count(),
            "unacked": client.hlen("unacked"),
            "parked": DelayedSet(client).count()
            if hasattr(DelayedSet, "count")
            else client.zcard("proj:delayed"),
        }
        server.stop()  # SIGTERM: Redis writes its AOF and exits
        time.sleep(DOWN_FOR)
        server.start("--appendonly", "yes", "--appendfsync", "everysec")
        back = time.monotonic()
        probe = app.send_task("tasks.health.canary")
        probe.get(timeout=60)
        resumed_in = time.monotonic() - back

        everything = parked + canaries + mails + [probe]
        for result in everything:
            result.get(timeout=240, propagate=False)
        assert all(w.proc is not None and w.proc.poll() is None for w in workers), "a worker exited"
        failed = [r for r in everything if r.state != "SUCCESS"]
        inbox = Counter(r.message["Message-ID"] for r in smtp_server.handler.received)
        wanted = {message_id_for(k, Settings()) for k in keys}
        runs = runs_by_id(*(w.log() for w in workers))
        twice = {i: n for i, n in runs.items() if n > 1}
        duplicated = len(twice) + sum(n - 1 for n in inbox.values() if n > 1)
        report(
            Outcome(
                "redis restarted",
                sent=len(everything),
                done=len(everything) - len(failed),
                lost=len(failed) + len(wanted - set(inbox)),
                duplicated=duplicated,
                resumed_in=resumed_in,
                note=", ".join(f"{k}={v}" for k, v in held.items()) + " at the restart",
            )
        )
        assert not failed, [(r.id, r.state, r.result) for r in failed[:5]]
        assert set(inbox) == wanted and max(inbox.values()) == 1
        assert not twice, {
            i: [line for w in workers for line in w.log().splitlines() if i in line] for i in list(twice)[:3]
        }
        assert resumed_in < 30
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
