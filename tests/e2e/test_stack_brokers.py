"""`proj up` on the brokers of docs/rabbitmq.md and docs/sentinel.md, used from another shell."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import redis

from tests.e2e.localstack import VENV_BIN, LocalStack, stack_environ
from tests.faults.sentinel import MASTER, SentinelServer, sentinel_url
from tests.harness import ROOT, RedisServer
from tests.rabbitmq import AMQP_HOST, AMQP_PORT, fixture_vhost, rabbitmqctl  # noqa: F401 (the vhost fixture)

pytestmark = pytest.mark.e2e

QUEUES = ("email", "email_bulk", "files", "default")
WORKERS = ("default-1", "default-2", "email-1", "email-2", "files")
NO_BROKER_API = "queue lengths on RabbitMQ come from"


def _canaries(stack: LocalStack) -> dict[str, dict[str, object]]:
    """A canary through every queue from a shell that sourced stack.env: queue -> state and result."""
    run = stack.sourced(f"python -m tests.e2e.canary_client {' '.join(QUEUES)}")
    assert run.returncode == 0, run.stdout + run.stderr + stack.log()[-3000:]
    ids, answers = (json.loads(line) for line in run.stdout.splitlines()[-2:])
    assert {q: a["state"] for q, a in answers.items()} == {q: "SUCCESS" for q in QUEUES}, answers
    assert {q: a["result"]["queue"] for q, a in answers.items()} == {q: q for q in QUEUES}
    return {q: {**answers[q], "id": ids[q]} for q in QUEUES}


def _status_lists_every_worker(stack: LocalStack) -> None:
    status = stack.sourced("proj status --json --timeout 3")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert [name.split("@")[0] for name in report["workers"]] == list(WORKERS), report["workers"]
    assert {queue["name"]: queue["depth"] for queue in report["queues"]} == {q: 0 for q in QUEUES}


def _stop_with_ctrl_c(stack: LocalStack) -> None:
    left = stack.stop()
    assert not left, f"processes left running after Ctrl-C: {left}\n{stack.log()[-3000:]}"
    assert stack.proc is not None and stack.proc.returncode == 0, stack.log()[-3000:]
    assert stack.log().rstrip().endswith("proj up: stopped"), stack.log()[-3000:]


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_stack_on_rabbitmq_keeps_the_amqp_broker_and_runs_redis_for_results(vhost, tmp_path):
    amqp_url = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
    broker_api = f"http://guest:guest@{AMQP_HOST}:15672/api/"
    local_dir = tmp_path / "local"
    # A vhost that does not exist: said at once, nothing started (workers would retry for ever).
    wrong = stack_environ(local_dir, CELERY_BROKER_URL=f"{amqp_url}-missing")
    refused = subprocess.run(
        [str(VENV_BIN / "proj"), "up"], cwd=ROOT, env=wrong, capture_output=True, text=True
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"vhost {vhost}-missing not found" in refused.stderr and "guest:guest" not in refused.stderr
    assert not (local_dir / "logs").exists()
    # REDIS_URL unset: the stack runs its own Redis for results and proj's stores, RabbitMQ brokers.
    env = stack_environ(local_dir, CELERY_BROKER_URL=amqp_url, FLOWER_BROKER_API=broker_api)
    stack = LocalStack(local_dir, env).start()
    try:
        assert "stack ready" in stack.log(), stack.log()
        exports = stack.exports()
        redis_url = f"redis://127.0.0.1:{env['REDIS_PORT']}/0"
        assert (exports["CELERY_BROKER_URL"], exports["REDIS_URL"], exports["CELERY_RESULT_BACKEND"]) == (
            amqp_url,
            redis_url,
            redis_url,
        )
        assert "Broker   amqp://guest:**@" in stack.log() and "guest:guest" not in stack.log()

        answers = _canaries(stack)
        # The messages went through the vhost's quorum queues; the results are in the embedded Redis.
        rows = json.loads(rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--formatter", "json"))
        assert {row["name"]: row["type"] for row in rows if row["name"] in QUEUES} == dict.fromkeys(
            QUEUES, "quorum"
        )
        results = redis.Redis.from_url(redis_url)
        assert all(results.exists(f"celery-task-meta-{a['id']}") for a in answers.values())

        _status_lists_every_worker(stack)
        # FLOWER_BROKER_API reached Flower: its wrapper prints no line about the variable missing.
        assert "flower" in stack.log() and NO_BROKER_API not in stack.process_log("flower")
    finally:
        _stop_with_ctrl_c(stack)


@pytest.mark.timeout(240)
def test_stack_on_sentinel_starts_no_redis_and_follows_the_sentinels(tmp_path):
    master = RedisServer().start()
    replica = RedisServer().start("--replicaof", "127.0.0.1", str(master.port))
    sentinels = [SentinelServer(master.port) for _ in range(3)]
    url = sentinel_url(sentinels)
    local_dir = tmp_path / "local"
    env = stack_environ(local_dir, REDIS_URL=url, REDIS_SENTINEL_MASTER=MASTER)
    stack = LocalStack(local_dir, env)
    try:
        # The check before anything starts asks the sentinels: a name they do not know is said at once.
        wrong = {**env, "REDIS_SENTINEL_MASTER": "not-monitored"}
        refused = subprocess.run(
            [str(VENV_BIN / "proj"), "up"], cwd=ROOT, env=wrong, capture_output=True, text=True
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "No master found for 'not-monitored'" in refused.stderr, refused.stderr
        assert "REDIS_SENTINEL_MASTER names ('not-monitored')" in refused.stderr, refused.stderr
        assert not (local_dir / "logs").exists()

        stack.start()
        assert "stack ready" in stack.log(), stack.log()
        exports = stack.exports()
        assert (exports["REDIS_URL"], exports["CELERY_BROKER_URL"], exports["CELERY_RESULT_BACKEND"]) == (
            url,
            url,
            url,
        )
        assert exports["REDIS_SENTINEL_MASTER"] == MASTER
        assert stack.pids("redis") == [] and not _listens(int(env["REDIS_PORT"]))  # no Redis of its own

        answers = _canaries(stack)
        # Broker and results on the master the sentinels name (its replica has them too).
        assert all(master.client().exists(f"celery-task-meta-{a['id']}") for a in answers.values())
        _status_lists_every_worker(stack)
    finally:
        _stop_with_ctrl_c(stack)
        for server in sentinels:
            server.stop()
        replica.stop()
        master.stop()
