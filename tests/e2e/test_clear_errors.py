"""A Redis that cannot be used: `proj` commands, `proj up`, workers, beat and Flower say so in two lines."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proj.credentials import mask_url
from tests.e2e.localstack import VENV_BIN, stack_environ
from tests.harness import ROOT, free_port, stop_process, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "pw-never-shown"
# The bound: a `proj` command gives up within 5 s; the subprocess timeout enforces it.
COMMAND_BOUND = 5.0
COMMANDS = {
    "status": ["status"],
    "dlq": ["dlq", "list"],
    "send-email": ["send-email", "--to", "ann@example.com", "--subject", "hi", "--text", "hello"],
    "process-file": ["process-file", str(ROOT / "README.md")],
}


def _refused(program: str, url: str) -> str:
    """The first line, for a URL where nothing listens."""
    return (
        f"{program}: Redis at {mask_url(url)} cannot be reached: nothing listens there (connection refused)"
    )


def _dead_url() -> str:
    """A URL with a password on a port nothing listens on: a stopped stack's, as stack.env left it."""
    return f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"


def _environ(tmp_path: Path, url: str) -> dict[str, str]:
    """This shell after `source .local/stack.env` of a stack that has stopped since."""
    env = stack_environ(tmp_path / "local", REDIS_URL=url, CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _proj(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [str(VENV_BIN / "proj"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_BOUND,
    )
    return done.returncode, (done.stdout + done.stderr).splitlines()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_names_the_dead_redis_and_the_likely_cause(tmp_path: Path, command: str) -> None:
    url = _dead_url()
    code, lines = _proj(_environ(tmp_path, url), *COMMANDS[command])
    assert code == 1, lines
    assert len(lines) == 2, lines
    assert lines[0] == _refused(f"proj {command}", url), lines
    # The likely cause: variables left from a local stack that no longer runs.
    assert "Left from an earlier `source" in lines[1] and "unset REDIS_URL" in lines[1], lines
    assert PASSWORD not in "\n".join(lines)


@pytest.fixture
def not_a_redis() -> Iterator[int]:
    """A port where an HTTP server answers: something else took a stopped stack's Redis port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def test_a_server_that_is_not_redis_is_called_so(tmp_path: Path, not_a_redis: int) -> None:
    url = f"redis://127.0.0.1:{not_a_redis}/0"
    code, lines = _proj(_environ(tmp_path, url), "status")
    assert code == 1 and len(lines) == 2, lines
    assert (
        lines[0]
        == f"proj status: Redis at {url} is not a Redis: the server there answers in another protocol"
    )


def test_proj_up_with_a_dead_redis_url_starts_nothing(tmp_path: Path) -> None:
    url = _dead_url()
    code, lines = _proj(_environ(tmp_path, url), "up")
    assert code == 1 and len(lines) == 2, lines
    assert lines[0].startswith(f"proj up: Redis at {mask_url(url)} cannot be reached"), lines
    assert "`unset REDIS_URL CELERY_BROKER_URL CELERY_RESULT_BACKEND`" in lines[1], lines
    assert not (tmp_path / "local" / "logs").exists(), "no process was started"


@pytest.mark.parametrize("program", ["worker", "beat", "flower"])
def test_celery_processes_say_it_before_anything_else(tmp_path: Path, program: str) -> None:
    url = _dead_url()
    env = _environ(tmp_path, url)
    commands = {
        "worker": ["celery", "-A", "proj", "worker", "-P", "solo", "-n", f"dead-{free_port()}@%h"],
        "beat": ["celery", "-A", "proj", "beat", "-s", str(tmp_path / "beat-schedule")],
        "flower": ["python", "-m", "proj.integration.flower", "--address=127.0.0.1", f"--port={free_port()}"],
    }
    env["FLOWER_BASIC_AUTH"] = "admin:flower-pw"
    log = tmp_path / f"{program}.log"
    proc = subprocess.Popen(
        commands[program], cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )

    def lines() -> list[str]:
        return [line for line in log.read_text(errors="replace").splitlines() if line.strip()]

    try:
        wait_for(lambda: len(lines()) >= 3, timeout=30, what=f"{program}'s first lines")
    finally:
        stop_process(proc)
    # Beat's first line is Celery's "celery beat v5... is starting.", printed before any hook runs.
    first = 1 if program == "beat" else 0
    assert lines()[first] == _refused(program, url), lines()[:4]
    assert "Left from an earlier `source" in lines()[first + 1], lines()[:4]
    assert PASSWORD not in log.read_text()
