"""Malformed broker messages on every queue are set aside and logged; the workers go on.

Pushed straight onto the queue lists with the Redis client, as a buggy or hostile producer would:
not JSON, JSON that is not a kombu message, no delivery tag, no task headers, an unknown task
name (protocol 2 and protocol 1), and pickle bodies (protocol 2 and 1) that the worker must refuse.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import celeryconfig
from proj.stores.inflight import REGISTRY_KEY
from proj.stores.queues import UNACKED_KEY
from proj.stores.setaside import KEY as SET_ASIDE_KEY
from tests.conftest import smtp_env
from tests.faults.scenario import Outcome, report
from tests.harness import run_proj, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

QUEUES = ("email", "email_bulk", "files", "default")
CANARY = "tasks.health.canary"
PICKLE = "application/x-python-serialize"


def _message(
    queue: str,
    task: str = "tasks.does_not_exist",
    *,
    body: bytes | None = None,
    content_type: str = "application/json",
    headers: bool = True,
    delivery_tag: bool = True,
) -> bytes:
    """A message laid out as kombu's Redis transport stores it, with the parts asked for."""
    task_id = str(uuid.uuid4())
    if body is None:
        body = json.dumps(
            [[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        ).encode()
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "proj", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
    }
    if delivery_tag:
        properties["delivery_tag"] = str(uuid.uuid4())
    task_headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "test_malformed_messages",
    }
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": task_headers if headers else {},
            "properties": properties,
        }
    ).encode()


def _protocol1(task: str) -> bytes:
    return json.dumps({"task": task, "id": str(uuid.uuid4()), "args": [], "kwargs": {}}).encode()


# Each kind of malformed item, built for one queue. The first three fail inside the transport
# (kombu's own one, with PROJ_STOCK_CELERY=1, kills or restarts the consumer: docs/operations.md).
TRANSPORT_LEVEL: dict[str, Callable[[str], bytes]] = {
    "not_json": lambda q: b"\x00not json at all \xff " + q.encode(),
    "json_not_a_message": lambda q: json.dumps({"no": "properties", "queue": q}).encode(),
    "no_delivery_tag": lambda q: _message(q, CANARY, delivery_tag=False),
    # kombu's unacked record and proj's reject both read the exchange: without one it could never leave.
    "no_exchange": lambda q: json.dumps(
        {"body": "", "properties": {"delivery_tag": str(uuid.uuid4()), "delivery_info": {"routing_key": q}}}
    ).encode(),
}
CELERY_LEVEL: dict[str, Callable[[str], bytes]] = {
    "no_task_headers": lambda q: json.dumps(
        {
            "body": "",
            "properties": {
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "proj", "routing_key": q},
            },
        }
    ).encode(),
    "unknown_task": lambda q: _message(q),
    "pickle_protocol2": lambda q: _message(q, CANARY, content_type=PICKLE, body=pickle.dumps(((), {}, {}))),
    "unknown_task_protocol1": lambda q: _message(q, headers=False, body=_protocol1("tasks.does_not_exist")),
    "pickle_protocol1": lambda q: _message(
        q, headers=False, content_type=PICKLE, body=pickle.dumps({"task": CANARY, "id": "1", "args": []})
    ),
}


def _kinds() -> dict[str, Callable[[str], bytes]]:
    if celeryconfig.proj_stock_celery:
        return dict(CELERY_LEVEL)
    return {**TRANSPORT_LEVEL, **CELERY_LEVEL}


def _identity(raw: bytes) -> Any:
    """What stays the same when a handler re-serialises a message: its tag, headers and body."""
    try:
        parsed = json.loads(raw)
        props = parsed["properties"]
        return (props.get("delivery_tag"), json.dumps(parsed.get("headers"), sort_keys=True), parsed["body"])
    except (ValueError, KeyError, TypeError):
        return raw


def _drained(redis_client: Any) -> bool:
    """Nothing waits in a queue, nothing is delivered but unacknowledged."""
    if any(redis_client.llen(q) for q in QUEUES) or redis_client.hlen(UNACKED_KEY):
        return False
    return not any(redis_client.llen(name) for name in redis_client.hkeys(REGISTRY_KEY))


def test_malformed_messages_on_every_queue_are_set_aside_and_the_workers_go_on(
    start_worker, celery_app, redis_client, smtp_server, worker_env
):
    # The Procfile's layout: one worker of two queues (kombu's BRPOP path), one per single queue
    # (BLMOVE into an inflight list when proj's transport runs).
    workers = [
        start_worker("email,email_bulk", concurrency=4, env=smtp_env(smtp_server)),
        start_worker("files", pool="prefork", concurrency=1),
        start_worker("default", pool="solo", concurrency=1),
    ]
    kinds = _kinds()
    pushed = {(kind, q): build(q) for kind, build in kinds.items() for q in QUEUES}
    for (_, queue), raw in pushed.items():
        redis_client.lpush(queue, raw)

    try:
        wait_for(lambda: redis_client.llen(SET_ASIDE_KEY) >= len(pushed), timeout=60, what="all set aside")
        wait_for(lambda: _drained(redis_client), timeout=30, what="the queues to drain")
    except TimeoutError as exc:
        depths = {q: redis_client.llen(q) for q in QUEUES}
        logs = "\n".join(w.log()[-4000:] for w in workers)
        kept = redis_client.llen(SET_ASIDE_KEY)
        raise AssertionError(f"{exc}: {kept} of {len(pushed)} set aside, queues {depths}\n{logs}") from None

    kept = Counter(_identity(raw) for raw in redis_client.lrange(SET_ASIDE_KEY, 0, -1))
    missing = [key for key, raw in pushed.items() if kept[_identity(raw)] < 1]
    duplicated = sum(n - 1 for n in kept.values() if n > 1)
    assert not missing and not duplicated, f"not set aside: {missing}, set aside twice: {duplicated}"

    # The same workers are alive, answer a ping and run a normal task on every queue.
    for worker in workers:
        assert worker.proc.poll() is None, worker.log()[-3000:]
    names = [w.nodename for w in workers]
    assert len(celery_app.control.ping(destination=names, timeout=5)) == len(workers)
    results = {q: celery_app.send_task(CANARY, queue=q) for q in QUEUES}
    answered = {q: r.get(timeout=30) for q, r in results.items()}
    assert {q: a["queue"] for q, a in answered.items()} == {q: q for q in QUEUES}
    assert {a["hostname"] for a in answered.values()} <= set(names)

    # Each one is in a worker's log, and `proj status` counts them.
    logs = "\n".join(w.log() for w in workers)
    assert logs.count("Set aside a message from") + logs.count("Not a kombu message in") == len(pushed)
    status = run_proj(worker_env, "status", "--json", "--timeout", "2", timeout=90)
    assert json.loads(status.stdout)["set_aside"] == len(pushed), status.stderr

    report(
        Outcome(
            "malformed messages",
            sent=len(pushed),
            done=len(pushed) - len(missing),
            lost=len(missing),
            duplicated=duplicated,
            note=f"{len(kinds)} kinds x {len(QUEUES)} queues set aside; workers alive"
            + (", transport-level kinds not sent (stock kombu)" if celeryconfig.proj_stock_celery else ""),
        )
    )
