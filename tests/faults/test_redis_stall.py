"""Redis stalled for 40 s (SIGSTOP, as a network stall looks to its clients) under load, then resumed.

Load: 1,000 default tasks and 200 emails.

Connections stay open and nothing answers: every client runs into its timeouts. Afterwards every
worker must consume again, nothing may be lost, and no email the server accepted may be sent again
because its ledger record could not be written during the stall.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.faults.scenario import report, scaled
from tests.faults.stack import fault_stack
from tests.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

STALL = 40.0


@pytest.mark.timeout(420)
def test_redis_stalled_40s_every_worker_consumes_again_and_nothing_is_lost(
    worker_env, smtp_server, monkeypatch
):
    with fault_stack(worker_env, smtp_server, monkeypatch) as stack:
        client = stack.server.client()
        defaults, emails = scaled(1000), scaled(200)
        stack.canaries(defaults, hold=0.005)
        stack.emails(emails, "stall")
        wait_for(
            lambda: len(smtp_server.handler.received) >= emails // 5, timeout=120, what="a fifth of the mail"
        )
        assert stack.server.proc is not None
        os.kill(stack.server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(STALL)
        finally:
            os.kill(stack.server.proc.pid, signal.SIGCONT)
        back = time.monotonic()
        logged = [len(worker.log()) for worker in stack.workers]
        wait_for(lambda: client.llen("default") == 0, timeout=120, what="the default backlog taken")
        probe = stack.canaries(1)[0]
        probe.get(timeout=60)
        resumed_in = time.monotonic() - back

        outcome, facts = stack.outcome(f"redis stalled {STALL:.0f}s", timeout=240, resumed_in=resumed_in)
        report(outcome)
        assert stack.alive(), "a worker exited"
        assert not facts["failed"], [(r.id, r.state, r.result) for r in facts["failed"][:5]]
        assert not facts["missing"] and max(facts["inbox"].values()) == 1
        assert not facts["twice"], facts["twice"]
        # Every worker took work again after the stall.
        for worker, seen in zip(stack.workers, logged, strict=True):
            assert "succeeded" in worker.log()[seen:], f"{worker.nodename} ran nothing after the stall"
