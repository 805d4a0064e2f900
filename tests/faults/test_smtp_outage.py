"""SMTP unreachable for 20 s in the middle of 300 sends, then back on the same port: each delivered once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from proj.mail import message_id_for
from proj.mail.retry import outage_bound
from proj.settings import Settings
from proj.stack.devsmtp import MailSink, start
from tests.faults.scenario import Outcome, report
from tests.harness import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

SENDS = 300
OUTAGE = 20.0  # seconds nothing listens on the SMTP port
# Production's policy at a test's scale: delays from 1-2 s doubling up to 5-10 s, 10 retries. The
# conftest's EMAIL_RETRY_BACKOFF_MAX=2 would allow only 10 s of outage (outage_bound); this, 42 s.
RETRY_ENV = {"EMAIL_RETRY_BACKOFF_MAX": "10", "EMAIL_MAX_RETRIES": "10"}


def _cut(controller: Any) -> None:
    """Take the server off the network: stop listening, reset every open session, stop the thread.

    Controller.stop() alone stops the loop with the sessions' sockets still open, so clients would
    hang until SMTP_TIMEOUT instead of seeing the connection go, as they do when a host goes away.
    """

    async def drop() -> None:
        controller.server.close()  # connecting is refused from now on
        sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for session in sessions:
            session.cancel()  # aiosmtpd closes the session's transport when cancelled
        await asyncio.gather(*sessions, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)  # the transports' close callbacks run: the sockets are closed

    asyncio.run_coroutine_threadsafe(drop(), controller.loop).result(timeout=10)
    controller.stop()


@pytest.mark.timeout(300)
def test_smtp_unreachable_for_20s_during_300_sends_delivers_each_once(start_worker):
    from tasks.email import send_email

    bound = outage_bound(Settings.from_env(RETRY_ENV))
    assert bound >= 2 * OUTAGE  # computed from the policy: no message can run out of retries

    port = free_port()
    handler = MailSink(delay=0.05)  # 50 ms a reply: 300 sends take seconds, the cut lands mid-stream
    controller = start(handler, "127.0.0.1", port)
    running = True
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), **RETRY_ENV}
    try:
        workers = [start_worker("email,email_bulk", concurrency=8, env=env) for _ in range(2)]
        print("worker logs:", *(w.log_path for w in workers))
        keys = [f"outage-{i}" for i in range(SENDS)]
        results = [
            send_email.delay(to=f"u{i}@example.com", subject="s", text="t", idempotency_key=key)
            for i, key in enumerate(keys)
        ]
        wait_for(lambda: len(handler.received) >= SENDS // 3, timeout=120, what="a third delivered")
        _cut(controller)
        running = False
        delivered_before = len(handler.received)
        assert delivered_before < SENDS, "everything arrived before the cut: no outage was tested"

        time.sleep(OUTAGE)  # the scenario itself: the server stays away this long
        controller = start(handler, "127.0.0.1", port)  # back on the same port, same mailbox
        running = True
        back_at = time.time()

        deadline = time.monotonic() + 120
        for result in results:
            result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False)
    finally:
        if running:
            controller.stop()

    failed = [r for r in results if r.state != "SUCCESS"]
    inbox = Counter(r.message["Message-ID"] for r in handler.received)
    wanted = {message_id_for(key, Settings()) for key in keys}
    retried = [r.retries for r in results if r.retries]
    outcome = report(
        Outcome(
            f"smtp unreachable {OUTAGE:.0f}s",
            sent=SENDS,
            done=SENDS - len(failed),
            lost=len(failed) + len(wanted - set(inbox)),
            duplicated=sum(n - 1 for n in inbox.values() if n > 1),
            resumed_in=max(r.received_at for r in handler.received) - back_at,
            note=(
                f"{SENDS - delivered_before} pending at the cut, {len(retried)} retried, "
                f"at most {max(retried, default=0)} retries of {RETRY_ENV['EMAIL_MAX_RETRIES']}, "
                f"outage bound {bound:.0f}s"
            ),
        )
    )
    assert not failed, [(r.id, r.state, r.result) for r in failed[:5]]
    assert set(inbox) == wanted and outcome.lost == 0
    assert outcome.duplicated == 0, [m for m, n in inbox.items() if n > 1][:5]
    assert retried, "no send met the outage"
