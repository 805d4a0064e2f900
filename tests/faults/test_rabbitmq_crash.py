"""RabbitMQ workers SIGKILLed mid-run: 1,000 default tasks and 200 emails in a vhost of their own.

Two default workers (prefork, two processes, acks late) and two email workers (threads) consume
proj's quorum queues; results and proj's stores are on the session's private Redis. One worker of
each kind is SIGKILLed while it holds messages and a replacement started. RabbitMQ gives back what a
closed connection left unacknowledged, so nothing may be lost. At least once: a task the killed
worker had finished but not yet acknowledged runs again; such runs are counted apart, and nothing
else may run twice. Emails reach the server once (the ledger is in Redis), except inside the window
the ledger cannot close: the server accepted a message and the worker died before recording it.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from proj.mail import message_id_for
from proj.settings import Settings
from tests.conftest import EMAIL_QUEUES, smtp_env
from tests.faults.scenario import Outcome, report, runs_by_id, scaled, settle
from tests.harness import WorkerProcess, wait_for
from tests.rabbitmq import (  # noqa: F401  (the fixtures, by their names)
    fixture_amqp_app,
    fixture_amqp_url,
    fixture_amqp_worker,
    fixture_vhost,
    ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

CANARY = "tasks.health.canary"
SEND_EMAIL = "tasks.email.send_email"
HOLD = 0.005  # seconds per canary: short, so the kill finds the workers between many tasks
# How long before the kill the first copy of an email sent twice may have arrived (as in
# test_email_workers_killed.py): the server's 250 and the "sent" record are milliseconds apart.
WINDOW_BEFORE_KILL = 2.0


def _received(log: str) -> set[str]:
    return set(re.findall(r"Task [\w.]+\[([0-9a-f-]{36})\] received", log))


def _held(worker: WorkerProcess) -> set[str]:
    """Ids the worker has taken and not yet finished, from its log."""
    log = worker.log()
    return _received(log) - set(runs_by_id(log))


def _kill_while_holding(worker: WorkerProcess, what: str) -> tuple[float, int]:
    """SIGKILL the worker (main process and pool) once it holds messages; when, and how many it held."""
    held = wait_for(lambda: _held(worker), timeout=60, interval=0.01, what=f"the {what} worker holding work")
    worker.kill()
    return time.time(), len(held)


@pytest.mark.timeout(300)
def test_rabbitmq_workers_sigkilled_mid_run_lose_nothing(amqp_worker, amqp_app, smtp_server):
    canaries, emails = scaled(1000), scaled(200)
    email_env = {**smtp_env(smtp_server), "SMTP_TIMEOUT": "5"}  # a 20 s claim window for a redelivery
    keys = [f"rmq-killed-{i}" for i in range(emails)]
    # The whole backlog waits in RabbitMQ before the workers start: the kills find work in flight.
    sent = [
        amqp_app.send_task(
            SEND_EMAIL, kwargs={"to": f"r{i}@example.com", "subject": "s", "text": "t", "idempotency_key": k}
        )
        for i, k in enumerate(keys)
    ] + [amqp_app.send_task(CANARY, kwargs={"hold": HOLD}) for _ in range(canaries)]
    canary_ids = {r.id for r in sent[emails:]}
    mailers = [amqp_worker(EMAIL_QUEUES, env=email_env, wait=False) for _ in range(2)]
    defaults = [amqp_worker("default", pool="prefork", concurrency=2, wait=False) for _ in range(2)]
    for worker in mailers + defaults:
        wait_for(lambda w=worker: ready(w), timeout=90, interval=0.2, what=f"{worker.nodename} ready")

    handler = smtp_server.handler
    wait_for(lambda: len(handler.received) >= emails // 3, timeout=120, what="a third of the emails")
    email_kill, email_held = _kill_while_holding(mailers[0], "email")
    replacements = [amqp_worker(EMAIL_QUEUES, env=email_env, wait=False)]

    def canary_runs() -> int:
        return sum(runs_by_id(*(w.log() for w in defaults)).values())

    wait_for(lambda: canary_runs() >= canaries // 3, timeout=120, what="a third of the default tasks")
    _, default_held = _kill_while_holding(defaults[0], "default")
    last_kill = time.monotonic()
    replacements.append(amqp_worker("default", pool="prefork", concurrency=2, wait=False))
    for worker in replacements:
        wait_for(lambda w=worker: ready(w), timeout=90, interval=0.2, what=f"{worker.nodename} ready")

    stuck = settle(sent, timeout=180)
    resumed_in = time.monotonic() - last_kill
    failed = [r for r in sent if r.state != "SUCCESS"]
    runs = {
        i: n for i, n in runs_by_id(*(w.log() for w in defaults + replacements)).items() if i in canary_ids
    }
    twice = {i: n for i, n in runs.items() if n > 1}
    # At least once: what the killed worker finished but had not acknowledged is given back and runs again.
    finished_by_killed = set(runs_by_id(defaults[0].log()))
    firsts: dict[str, float] = {}
    for item in handler.received:
        firsts.setdefault(item.message["Message-ID"], item.received_at)
    inbox = Counter(item.message["Message-ID"] for item in handler.received)
    wanted = {message_id_for(k, Settings()) for k in keys}
    mail_twice = {mid: n for mid, n in inbox.items() if n > 1}
    in_window = [m for m in mail_twice if 0 <= email_kill - firsts[m] <= WINDOW_BEFORE_KILL]
    report(
        Outcome(
            "rabbitmq workers killed",
            sent=len(sent),
            done=len(sent) - len(failed),
            lost=len(failed) + len(wanted - set(inbox)),
            duplicated=sum(n - 1 for n in twice.values()) + sum(n - 1 for n in mail_twice.values()),
            resumed_in=resumed_in,
            note=(
                f"killed holding {default_held} tasks and {email_held} emails; "
                f"run again: {len(twice)} tasks the killed worker had finished and not acknowledged, "
                f"{len(in_window)} emails it had sent and not recorded; "
                "resumed_in: until every result was in"
            ),
        )
    )
    assert not stuck, [(r.id, r.state) for r in stuck[:5]]
    assert not failed, [(r.id, r.state, r.result) for r in failed[:5]]
    assert all(w.proc is not None and w.proc.poll() is None for w in [mailers[1], defaults[1], *replacements])
    assert set(runs) == canary_ids  # every canary ran, and the logs show it
    assert set(twice) <= finished_by_killed, {i: n for i, n in twice.items() if i not in finished_by_killed}
    assert all(n == 2 for n in twice.values()), twice
    assert set(inbox) == wanted
    assert len(in_window) == len(mail_twice), {m: firsts[m] for m in mail_twice if m not in in_window}
