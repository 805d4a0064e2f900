"""enqueue_many: many tasks in pipelined batches, each run once by a real worker."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from proj.celery import app as proj_app
from proj.integration.enqueue_many import enqueue_many
from proj.stores.queues import SENT_AT_HEADER as SENT_AT
from tests.conftest import smtp_env
from tests.harness import EventMonitor

pytestmark = [pytest.mark.integration, pytest.mark.stock_too]

CANARY = "tasks.health.canary"


def test_every_task_runs_exactly_once_on_a_real_worker(start_worker, celery_app, redis_client):
    worker = start_worker("default", concurrency=4)
    n = 250
    # batch_size below n: several pipelines, so the batch boundaries are exercised too.
    results = enqueue_many([celery_app.signature(CANARY) for _ in range(n)], batch_size=64)

    assert len({r.id for r in results}) == n
    answers = [r.get(timeout=30) for r in results]
    assert {a["hostname"] for a in answers} == {worker.nodename}
    assert {a["queue"] for a in answers} == {"default"}
    stats = celery_app.control.inspect(destination=[worker.nodename], timeout=5).stats()
    assert stats[worker.nodename]["total"] == {CANARY: n}  # none ran twice
    assert redis_client.llen("default") == 0 and redis_client.hlen("unacked") == 0


def test_routing_and_headers_are_those_of_delay(celery_app, redis_client):
    mail = celery_app.signature("tasks.email.send_email", kwargs={"to": "a@example.com", "subject": "s"})
    enqueue_many([mail, celery_app.signature(CANARY)])
    # No worker runs: each message waits on the queue its route names, as .delay() would put it.
    assert redis_client.llen("email") == 1 and redis_client.llen("default") == 1
    queued = json.loads(redis_client.lindex("email", 0))
    delayed = celery_app.send_task("tasks.email.send_email", kwargs={"to": "a@example.com", "subject": "s"})
    by_delay = json.loads(redis_client.lindex("email", 0))
    assert by_delay["headers"]["id"] == delayed.id
    assert set(queued["headers"]) == set(by_delay["headers"])
    assert queued["properties"]["delivery_info"] == by_delay["properties"]["delivery_info"]


def test_task_sent_events_reach_monitors(celery_app, redis_client):
    monitor = EventMonitor(celery_app, redis_client)
    results = enqueue_many([celery_app.signature(CANARY) for _ in range(3)])
    events = monitor.events_for([r.id for r in results])
    assert sorted(e["uuid"] for e in events) == sorted(r.id for r in results)  # each once
    assert {e["queue"] for e in events} == {"default"}


def test_a_long_countdown_is_parked_outside_the_broker_as_with_delay(celery_app, redis_client):
    mail = celery_app.signature(
        "tasks.email.send_email", kwargs={"to": "a@example.com", "subject": "s"}, countdown=3600
    )
    [result] = enqueue_many([mail, celery_app.signature(CANARY)])[:1]
    assert redis_client.llen("email") == 0 and redis_client.llen("default") == 1
    parked = [json.loads(member) for member in redis_client.zrange("proj:delayed", 0, -1)]
    assert [json.loads(p["m"])["headers"]["id"] for p in parked] == [result.id]


def test_nothing_to_enqueue_is_a_no_op(celery_app):
    assert enqueue_many([]) == []


def _mail(n: int) -> Any:
    from tasks.email import send_email

    return send_email.s(to=f"user{n}@example.com", subject=f"Report {n}", text=f"Body {n}")


def test_copied_messages_differ_from_celerys_only_in_their_own_fields(celery_app, redis_client):
    from celery.utils.saferepr import saferepr

    results = enqueue_many([_mail(n) for n in range(3)])
    # LPUSH: the newest message is at the head; index 2 is the first, built whole by apply_async.
    built, *copies = [json.loads(raw) for raw in reversed(redis_client.lrange("email", 0, -1))]
    own = {"id", "root_id", "argsrepr", "kwargsrepr", SENT_AT}
    for n, (message, result) in enumerate(zip([built, *copies], results, strict=True)):
        headers = message["headers"]
        assert headers["id"] == headers["root_id"] == result.id
        args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
        assert (args, kwargs) == ([], _mail(n).kwargs)
        assert headers["kwargsrepr"] == saferepr(_mail(n).kwargs, 1024)
        assert message["properties"]["correlation_id"] == result.id
        assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        assert time.time() - headers[SENT_AT] < 60  # before_task_publish ran for each one
    for copy in copies:
        assert {k: v for k, v in copy["headers"].items() if k not in own} == {
            k: v for k, v in built["headers"].items() if k not in own
        }
        assert _without(copy["properties"], "correlation_id", "delivery_tag") == _without(
            built["properties"], "correlation_id", "delivery_tag"
        )
        assert _without(copy, "body", "headers", "properties") == _without(
            built, "body", "headers", "properties"
        )


def test_a_bad_argument_anywhere_enqueues_nothing(celery_app, redis_client):
    from tasks.email import send_email

    bad = send_email.s(to="a@example.com", subject="s", colour="red")
    with pytest.raises(TypeError, match="colour"):
        enqueue_many([_mail(0), _mail(1), bad, _mail(2)])
    assert redis_client.llen("email") == 0


def test_bulk_mail_is_delivered_once_each_with_its_own_arguments(start_worker, smtp_server, celery_app):
    start_worker("email,email_bulk", env=smtp_env(smtp_server))
    n = 40
    results = enqueue_many([_mail(i) for i in range(n)], batch_size=16)

    answers = [r.get(timeout=60) for r in results]
    assert len({a["message_id"] for a in answers}) == n
    received = {m.message["Subject"]: m for m in smtp_server.handler.received}
    assert sorted(received) == sorted(f"Report {i}" for i in range(n))  # each once, none missing
    for i in range(n):
        message = received[f"Report {i}"]
        assert message.rcpt_tos == [f"user{i}@example.com"]
        assert message.message.get_body(("plain",)).get_content().strip() == f"Body {i}"


def _without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


@proj_app.task(name="tasks.tests.fan_out", shared=False)
def fan_out() -> list[str]:
    """Enqueue three canaries from inside a task (registered at import: workers learn tasks at start)."""
    return [r.id for r in enqueue_many([proj_app.signature(CANARY, args=(0.0,)) for _ in range(3)])]


def test_copies_sent_from_inside_a_task_name_it_as_parent_and_root(inprocess_worker, redis_client):
    monitor = EventMonitor(proj_app, redis_client)
    parent = fan_out.delay()
    children = parent.get(timeout=30)
    events = monitor.events_for(children)

    assert len(events) == 3  # the first built by apply_async, the two others copies of it
    assert {(e["parent_id"], e["root_id"]) for e in events} == {(parent.id, parent.id)}
    assert [proj_app.AsyncResult(c).get(timeout=30)["queue"] for c in children] == ["default"] * 3
