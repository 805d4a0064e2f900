"""A deploy under load: SIGTERM to every worker during a burst of 5,000 mixed tasks, then a restart."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter

import pytest

from proj.mail import message_id_for
from proj.settings import Settings
from tests.conftest import smtp_env
from tests.faults.scenario import Outcome, report, runs_by_id, scaled
from tests.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

FLEET = (  # (queues, pool, concurrency): the local stack's kinds of worker
    ("default", "solo", 1),
    ("default", "solo", 1),
    ("email,email_bulk", "threads", 4),
    ("email,email_bulk", "threads", 4),
    ("files", "prefork", 2),
)


@pytest.mark.timeout(400)
def test_sigterm_to_every_worker_mid_burst_then_restart_loses_nothing(
    start_worker, celery_app, smtp_server, files_root, redis_client
):
    from tasks.email import send_email
    from tasks.files import inspect_file

    env = smtp_env(smtp_server)

    def fleet() -> list:
        return [start_worker(q, pool=p, concurrency=c, env=env) for q, p, c in FLEET]

    workers = fleet()
    (files_root / "deploy.txt").write_text("a file to inspect\n" * 100)
    total = scaled(5000)
    keys: list[str] = []
    everything: list = []

    def send(i: int) -> None:  # 7 in 10 default tasks, 2 emails, 1 file task, interleaved
        if i % 10 < 7:
            everything.append(celery_app.send_task("tasks.health.canary", args=[0.002]))
        elif i % 10 < 9:
            keys.append(f"deploy-{i}")
            everything.append(
                send_email.delay(to=f"d{i}@example.com", subject="s", text="t", idempotency_key=keys[-1])
            )
        else:
            everything.append(inspect_file.delay("deploy.txt"))

    burst = threading.Thread(target=lambda: [send(i) for i in range(total)])
    burst.start()  # the deploy comes while the burst is still arriving
    wait_for(lambda: len(everything) >= total * 0.4, timeout=120, what="two fifths of the burst sent")
    at_term = {q: redis_client.llen(q) for q in ("default", "email", "files")}
    for worker in workers:  # the deploy: every worker told to stop at once, as an orchestrator does
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
    codes = [w.proc.wait(120) for w in workers if w.proc is not None]
    burst.join(120)
    waiting = sum(redis_client.llen(q) for q in ("default", "email", "files"))
    restarted = time.monotonic()
    workers += fleet()

    for result in everything:
        result.get(timeout=240, propagate=False)
    resumed_in = time.monotonic() - restarted
    failed = [r for r in everything if r.state != "SUCCESS"]
    inbox = Counter(r.message["Message-ID"] for r in smtp_server.handler.received)
    wanted = {message_id_for(k, Settings()) for k in keys}
    runs = runs_by_id(*(w.log() for w in workers))
    twice = {i: n for i, n in runs.items() if n > 1}
    # Celery's prefork pool may not acknowledge a task that finishes once its worker's warm shutdown
    # has begun (celery#3802, open): the message goes back and runs again after the restart.
    unacked = {i for i in twice if any(_ended_after_warm_shutdown(w.log(), i) for w in workers[: len(FLEET)])}
    report(
        Outcome(
            "deploy under load",
            sent=len(everything),
            done=len(everything) - len(failed),
            lost=len(failed) + len(wanted - set(inbox)),
            duplicated=len(twice) + sum(n - 1 for n in inbox.values() if n > 1),
            resumed_in=resumed_in,
            note=(
                f"exit codes {sorted(set(codes))}, queued at SIGTERM {at_term}, {waiting} at the restart; "
                f"run again: {len(unacked)} prefork task(s) ended after the warm shutdown began (celery#3802)"
            ),
        )
    )
    assert codes == [0] * len(FLEET)  # a warm shutdown, not a crash
    assert not failed, [(r.id, r.state, r.result) for r in failed[:5]]
    assert set(inbox) == wanted and max(inbox.values()) == 1
    assert set(twice) == unacked, {i: n for i, n in twice.items() if i not in unacked}
    assert all(n == 2 for n in twice.values()) and len(unacked) <= 2  # the files worker runs two at once


def _ended_after_warm_shutdown(log: str, task_id: str) -> bool:
    """Whether this worker log shows `task_id` finished in a prefork child after the warm shutdown began."""
    warm = log.find("worker: Warm shutdown")
    done = re.search(rf"INFO/ForkPoolWorker-\d+\] Task [\w.]+\[{task_id}\] succeeded", log)
    return warm != -1 and done is not None and done.start() > warm
