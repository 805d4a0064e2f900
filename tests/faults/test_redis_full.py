"""Redis full (maxmemory, noeviction): a clear error for callers, workers stay up, nothing accepted lost."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from proj.mail import message_id_for
from proj.settings import Settings
from tests.conftest import smtp_env
from tests.faults.scenario import Outcome, report, runs_by_id
from tests.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

DEFAULT_TASKS = 600
EMAILS = 120
FULL_FOR = 15.0  # seconds Redis refuses writes while workers hold taken messages


@pytest.mark.timeout(300)
def test_a_full_redis_refuses_callers_clearly_and_loses_nothing_accepted(
    start_worker, celery_app, redis_client, smtp_server
):
    from redis.exceptions import OutOfMemoryError

    from tasks.email import send_email

    env = {**smtp_env(smtp_server), "BROKER_RESTORE_INTERVAL": "1", "BROKER_INFLIGHT_LEASE": "10"}
    workers = [
        start_worker("default", pool="solo", concurrency=1, env=env),
        start_worker("default", concurrency=4, env=env),
        start_worker("email,email_bulk", concurrency=4, env=env),
        start_worker("email,email_bulk", concurrency=4, env=env),
    ]
    canaries = [celery_app.send_task("tasks.health.canary", args=[0.01]) for _ in range(DEFAULT_TASKS)]
    keys = [f"full-{i}" for i in range(EMAILS)]
    mails = [
        send_email.delay(to=f"u{i}@example.com", subject="s", text="t", idempotency_key=k)
        for i, k in enumerate(keys)
    ]
    wait_for(lambda: len(smtp_server.handler.received) >= EMAILS // 4, timeout=120, what="a quarter sent")

    used = int(redis_client.info("memory")["used_memory"])
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", str(used // 2))  # every write that adds memory is refused now
    try:
        with pytest.raises(Exception) as caught:
            celery_app.send_task("tasks.health.canary")
        assert "maxmemory" in str(caught.value) or isinstance(caught.value, OutOfMemoryError), caught.value
        time.sleep(FULL_FOR)
    finally:
        redis_client.config_set("maxmemory", "0")
    freed_at = time.monotonic()

    states = [r.get(timeout=180, propagate=False) and r.state for r in canaries + mails]
    resumed_in = time.monotonic() - freed_at
    assert all(w.proc is not None and w.proc.poll() is None for w in workers), "a worker exited"
    failed = [r for r in canaries + mails if r.state != "SUCCESS"]
    inbox = Counter(r.message["Message-ID"] for r in smtp_server.handler.received)
    wanted = {message_id_for(k, Settings()) for k in keys}
    runs = runs_by_id(*(w.log() for w in workers))
    lost = len(failed) + len(wanted - set(inbox))
    duplicated = sum(n - 1 for n in inbox.values() if n > 1) + sum(
        n - 1 for i, n in runs.items() if n > 1 and i in {c.id for c in canaries}
    )
    report(
        Outcome(
            "redis full",
            sent=DEFAULT_TASKS + EMAILS,
            done=sum(1 for s in states if s == "SUCCESS"),
            lost=lost,
            duplicated=duplicated,
            resumed_in=resumed_in,
        )
    )
    assert not failed, [(r.id, r.state, r.result) for r in failed[:5]]
    assert set(inbox) == wanted and max(inbox.values()) == 1
    assert "Unrecoverable error" not in "".join(w.log() for w in workers)
    twice = {i: n for i, n in runs.items() if n > 1 and i in {c.id for c in canaries}}
    assert not twice, {
        i: [ln for w in workers for ln in w.log().splitlines() if i in ln] for i in list(twice)[:2]
    }
