"""Redis restarted (AOF everysec, 5 s down) under 3,000 default tasks and 400 emails in flight.

At the restart Redis holds every kind of state proj keeps: queued messages, inflight lists and their
leases (the default workers take with BLMOVE), unacked records (the email workers consume two
queues), parked delays and ledger claims. Workers must come back by themselves, lose nothing, and
no process may run a task again because its own connection went away.
"""

from __future__ import annotations

import time

import pytest

from proj.stores.inflight import InflightLists
from tests.faults.scenario import report, scaled
from tests.faults.stack import fault_stack
from tests.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

AOF = ("--appendonly", "yes", "--appendfsync", "everysec")
DOWN_FOR = 5.0
PARK_AFTER = 31  # seconds: longer than celeryconfig's broker_max_countdown (30), so parked in Redis


@pytest.mark.timeout(420)
def test_redis_restart_under_load_loses_nothing_and_workers_resume(worker_env, smtp_server, monkeypatch):
    with fault_stack(worker_env, smtp_server, monkeypatch, *AOF) as stack:
        client = stack.server.client()
        defaults, emails = scaled(3000), scaled(400)
        stack.canaries(scaled(50), countdown=PARK_AFTER)
        stack.canaries(defaults, hold=0.005)  # 5 ms each: the restart finds them running, taken, queued
        stack.emails(emails, "restart")
        wait_for(
            lambda: len(smtp_server.handler.received) >= emails // 5, timeout=120, what="a fifth of the mail"
        )
        wait_for(
            lambda: client.llen("default") <= defaults * 0.7, timeout=120, what="a third of the tasks taken"
        )
        held = {
            "queued": client.llen("default") + client.llen("email"),
            "inflight": InflightLists(client).count(),
            "unacked": client.hlen("unacked"),
            "parked": client.zcard("proj:delayed"),
        }
        stack.server.stop()  # SIGTERM: Redis writes its AOF and exits
        time.sleep(DOWN_FOR)
        stack.server.start(*AOF)
        back = time.monotonic()
        # A new task waits behind the backlog: taken within 30 s means every queue is consumed again.
        probe = stack.canaries(1)[0]
        probe.get(timeout=60)
        resumed_in = time.monotonic() - back

        note = ", ".join(f"{k}={v}" for k, v in held.items()) + " at the restart"
        outcome, facts = stack.outcome("redis restarted", timeout=240, resumed_in=resumed_in, note=note)
        report(outcome)
        assert stack.alive(), "a worker exited"
        assert not facts["failed"], [(r.id, r.state, r.result) for r in facts["failed"][:5]]
        assert not facts["missing"] and max(facts["inbox"].values()) == 1
        assert not facts["twice"], facts["twice"]
        assert resumed_in < 30
