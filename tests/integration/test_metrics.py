"""proj's series on Flower's /metrics: what Redis holds, behind Flower's auth, as `proj status` shows."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proj.integration.metrics import ProjCollector
from proj.stores.connection import redis_client as proj_redis_client
from tests.harness import flower_process, free_port, run_proj, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.stock_too]

USER, PASSWORD = "ops", "metrics-secret"
# Messages left waiting where no worker runs: distinct counts, so a swapped label shows.
WAITING = {"email": 3, "files": 2, "default": 1}
PARKED = {"files": 2, "default": 1}  # countdowns far past BROKER_MAX_COUNTDOWN
BUSY = "email_bulk"  # the one queue a worker consumes: it holds two canaries, taken and unacknowledged
TAKEN = 2
PROJ_SERIES = {
    "proj_redis_up",
    "proj_queue_messages",
    "proj_queue_oldest_message_age_seconds",
    "proj_queue_unacked_messages",
    "proj_queue_parked_messages",
    "proj_dead_letters",
    "proj_set_aside_messages",
    "proj_canary_round_trip_seconds",
    "proj_canary_success",
    "proj_canary_last_probe_timestamp_seconds",
}


def _get(url: str, credentials: tuple[str, str] | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture
def flower_url(worker_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """Flower as the stack runs it (`python -m proj.integration.flower`), with basic auth; stopped by PID."""
    env = {k: v for k, v in worker_env.items() if not k.startswith("FLOWER_")}
    env["FLOWER_BASIC_AUTH"] = f"{USER}:{PASSWORD}"
    with flower_process(env, tmp_path / "flower.log") as url:
        yield url


def _scrape(url: str) -> dict[str, Any]:
    """The proj_ families of one authenticated scrape, parsed by prometheus_client's own parser."""
    status, text = _get(f"{url}/metrics", (USER, PASSWORD))
    assert status == 200, text
    return {
        family.name: family for family in text_string_to_metric_families(text) if family.name in PROJ_SERIES
    }


def _by_label(family: Any, label: str) -> dict[str, float]:
    return {sample.labels[label]: sample.value for sample in family.samples}


def _unacked_in_redis(redis_client: Any, queue: str) -> int:
    """Messages in the inflight lists of `queue` plus kombu's unacked records routed to it."""
    lists = [name for name, q in redis_client.hgetall("proj.stores.inflight").items() if q.decode() == queue]
    records = [json.loads(raw) for raw in redis_client.hvals("unacked")]
    return sum(redis_client.llen(name) for name in lists) + sum(1 for r in records if r[2] == queue)


def _parked_in_redis(redis_client: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for member in redis_client.zrange("proj:delayed", 0, -1):
        queue = json.loads(member)["q"]
        counts[queue] = counts.get(queue, 0) + 1
    return counts


def _oldest_sent_at(redis_client: Any, queue: str) -> float:
    return float(json.loads(redis_client.lindex(queue, -1))["headers"]["proj_sent_at"])


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the rich tables in `proj status` output."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if "│" in line
    ]


def test_metrics_show_what_redis_holds_behind_flowers_auth(
    flower_url: str, start_worker: Any, celery_app: Any, worker_env: dict[str, str], redis_client: Any
) -> None:
    worker = start_worker(BUSY, concurrency=TAKEN)
    # Dead letters of two kinds: a refused argument (permanent) and an unknown keyword (TypeError).
    failures = [
        celery_app.send_task("tasks.health.canary", kwargs={"hold": "x"}, queue=BUSY) for _ in range(2)
    ]
    failures.append(celery_app.send_task("tasks.health.canary", kwargs={"bogus": 1}, queue=BUSY))
    for result in failures:
        result.get(timeout=30, propagate=False)
        assert result.state == "FAILURE"
    wait_for(lambda: redis_client.zcard("proj:dlq:index") == 3, timeout=10, what="three dead letters")
    # A message for a task no worker knows is set aside.
    celery_app.send_task("tasks.health.no_such_task", queue=BUSY)
    wait_for(lambda: redis_client.llen("proj:unreadable") == 1, timeout=10, what="the message set aside")
    # A canary round trip, measured and recorded the way an operator does it.
    probe = run_proj(worker_env, "status", "--probe", "--queues", BUSY, "--json", "--timeout", "20")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    probed = json.loads(probe.stdout)["probes"][BUSY]
    assert probed["ok"], probed
    # Two canaries held by the worker: taken, not acknowledged.
    for _ in range(TAKEN):
        celery_app.send_task("tasks.health.canary", kwargs={"hold": 60}, queue=BUSY)
    wait_for(lambda: _unacked_in_redis(redis_client, BUSY) == TAKEN, timeout=20, what="both canaries taken")
    for queue, count in WAITING.items():
        for _ in range(count):
            celery_app.send_task("tasks.health.canary", queue=queue)
    for queue, count in PARKED.items():
        for _ in range(count):
            celery_app.send_task("tasks.health.canary", queue=queue, countdown=3600)
    assert {q: redis_client.llen(q) for q in WAITING} == WAITING
    assert _parked_in_redis(redis_client) == PARKED

    assert _get(f"{flower_url}/metrics", None)[0] == 401
    assert _get(f"{flower_url}/metrics", (USER, "wrong"))[0] == 401
    before = time.time()
    families = _scrape(flower_url)
    after = time.time()

    assert set(families) == PROJ_SERIES
    assert {family.type for family in families.values()} == {"gauge"}
    assert all(family.documentation for family in families.values())
    assert families["proj_redis_up"].samples[0].value == 1
    depths = _by_label(families["proj_queue_messages"], "queue")
    assert depths == {**WAITING, BUSY: 0} == {q: redis_client.llen(q) for q in [*WAITING, BUSY]}
    unacked = _by_label(families["proj_queue_unacked_messages"], "queue")
    assert unacked == {"email": 0, "files": 0, "default": 0, BUSY: TAKEN}
    assert unacked[BUSY] == _unacked_in_redis(redis_client, BUSY)
    parked = _by_label(families["proj_queue_parked_messages"], "queue")
    assert parked == {"email": 0, BUSY: 0, **PARKED}
    assert {q: n for q, n in parked.items() if n} == _parked_in_redis(redis_client)
    ages = _by_label(families["proj_queue_oldest_message_age_seconds"], "queue")
    assert ages[BUSY] == 0  # nothing waits there
    for queue in WAITING:
        sent_at = _oldest_sent_at(redis_client, queue)
        assert before - sent_at <= ages[queue] <= after - sent_at, (queue, ages[queue])
    dead = {(s.labels["task"], s.labels["error"]): s.value for s in families["proj_dead_letters"].samples}
    assert dead == {("tasks.health.canary", "PermanentError"): 2, ("tasks.health.canary", "TypeError"): 1}
    assert families["proj_set_aside_messages"].samples[0].value == 1 == redis_client.llen("proj:unreadable")
    assert _by_label(families["proj_canary_round_trip_seconds"], "queue") == {BUSY: probed["seconds"]}
    assert _by_label(families["proj_canary_success"], "queue") == {BUSY: 1}
    recorded = json.loads(redis_client.hget("proj:canary", BUSY))
    assert _by_label(families["proj_canary_last_probe_timestamp_seconds"], "queue") == {BUSY: recorded["at"]}

    # Flower's Broker page (its /api/queues/length) shows the same depths for the queues it lists.
    status, answer = _get(f"{flower_url}/api/queues/length", (USER, PASSWORD))
    listed = {q["name"]: q["messages"] for q in json.loads(answer)["active_queues"]}
    assert status == 200 and listed and listed == {q: depths[q] for q in listed}, answer

    # `proj status` reads the same figures.
    report = json.loads(run_proj(worker_env, "status", "--json", "--timeout", "2").stdout)
    shown = {q["name"]: q for q in report["queues"]}
    assert {q: s["depth"] for q, s in shown.items()} == depths
    assert {q: s["unacked"] for q, s in shown.items()} == unacked
    assert {q: s["parked"] for q, s in shown.items()} == parked
    assert {(d["task"], d["error"]): d["count"] for d in report["dead_letters_by_task"]} == dead
    assert report["set_aside"] == 1 and report["dead_letters"] == 3 and report["unacked"] == TAKEN
    assert [(c["queue"], c["seconds"]) for c in report["canaries"]] == [(BUSY, probed["seconds"])]
    text = run_proj({**worker_env, "COLUMNS": "200"}, "status", "--timeout", "2").stdout
    rows = {cells[0]: cells[1:] for cells in _table_rows(text) if cells[0] in shown}
    assert {q: [r[0], r[2], r[3]] for q, r in rows.items()} == {
        q: [str(int(depths[q])), str(int(unacked[q])), str(int(parked[q]))] for q in shown
    }, text
    assert f"{probed['seconds'] * 1000:.0f} ms by {worker.nodename}" in rows[BUSY][4]
    letters = [cells[1:] for cells in _table_rows(text) if cells[0] == "tasks.health.canary"]
    assert sorted(letters) == [["PermanentError", "2"], ["TypeError", "1"]], text
    assert "Set aside: 1" in text
    worker.kill()  # its two canaries would hold a warm shutdown for a minute


def test_a_redis_that_does_not_answer_leaves_proj_redis_up_0_and_no_figures(celery_app: Any) -> None:
    nobody = proj_redis_client(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    registry = CollectorRegistry()
    registry.register(ProjCollector(celery_app, nobody))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert set(families) == PROJ_SERIES
    assert [s.value for s in families["proj_redis_up"].samples] == [0]
    assert not [s for name, f in families.items() if name != "proj_redis_up" for s in f.samples]
