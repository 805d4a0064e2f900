"""A worker keeps consuming after Redis restarts under it (celery-landscape 2.5)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT, RedisServer, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.stock_too]

PRODUCE = (
    "from proj.celery import app\nprint(app.send_task('tasks.health.canary').get(timeout=60)['hostname'])\n"
)


def _canary(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PRODUCE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_worker_consumes_again_after_redis_restart(worker_env, monkeypatch):
    server = RedisServer().start("--appendonly", "yes", "--appendfsync", "always")
    url = server.url
    env = {**worker_env, "REDIS_URL": url, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}
    worker = WorkerProcess(queues="default", name="restart", env=env, concurrency=2)
    try:
        from celery import Celery

        # A separate app bound to this Redis, so the session's app is not disturbed by the restart
        # (Celery reads CELERY_BROKER_URL from the environment before its own configuration).
        monkeypatch.setenv("CELERY_BROKER_URL", url)
        monkeypatch.setenv("CELERY_RESULT_BACKEND", url)
        probe_app = Celery("probe")
        probe_app.config_from_object("celeryconfig")
        worker.start(probe_app)
        assert _canary(env) == worker.nodename

        server.stop()
        server.start("--appendonly", "yes", "--appendfsync", "always")

        assert _canary(env) == worker.nodename
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
        server.stop()
