"""A write Redis refuses (here an ACL forbids the ack) stops the worker taking work until Redis takes it."""

from __future__ import annotations

import pytest

from proj.stores.inflight import InflightLists
from tests.harness import wait_for

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
