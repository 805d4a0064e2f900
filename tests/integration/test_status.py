"""`proj status` against real Redis and a real worker."""

from __future__ import annotations

import json

import pytest

from tests.harness import run_proj

pytestmark = pytest.mark.integration


def _status(env, *args):
    return run_proj(env, "status", *args, timeout=90)


def test_status_reports_depth_age_workers_and_probes(start_worker, celery_app, worker_env):
    worker = start_worker("default,email", concurrency=2)
    for _ in range(3):
        celery_app.send_task("tasks.health.canary", queue="files")  # nobody consumes files here

    proc = _status(worker_env, "--probe", "--json", "--timeout", "3")
    report = json.loads(proc.stdout)
    queues = {q["name"]: q for q in report["queues"]}
    assert queues["files"]["depth"] == 3 and queues["files"]["oldest_age"] >= 0
    assert report["workers"] == {worker.nodename: ["default", "email"]}
    assert report["probes"]["default"]["ok"] and report["probes"]["email"]["worker"] == worker.nodename
    assert report["probes"]["files"] == {"ok": False, "error": "no answer within 3s"}
    assert proc.returncode == 1  # a queue nobody consumes is an alarm

    text = _status(worker_env)
    assert text.returncode == 0 and "files" in text.stdout and worker.nodename in text.stdout


def test_status_without_workers_fails(worker_env, redis_client):
    proc = _status(worker_env, "--timeout", "1")
    assert proc.returncode == 1
    assert "No worker answered" in proc.stdout
