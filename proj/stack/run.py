"""Running the local stack: Redis and SMTP first, the Celery processes under honcho, shutdown in order."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import honcho.manager
from honcho.environ import parse_procfile
from honcho.manager import Manager

from proj.stack.plan import Stack, StackError, write_env_file

# Started before the Celery processes and stopped after them: a worker finishing its tasks on
# Ctrl-C still needs Redis to ack them and SMTP to send the mail they are about.
BACKING = ("redis", "smtp")
# Procfile names of the workers; each runs as <name>@<hostname>.
WORKERS = ("email-1", "email-2", "default-1", "default-2", "files")
# Warm shutdown waits for running tasks, which the hard time limit (300 s) bounds; then SIGKILL.
SHUTDOWN_GRACE = 330
READY_TIMEOUT = 60.0
BACKING_TIMEOUT = 20.0


class _MainProcessSignals:
    """Signal each Procfile process itself first, and its whole process group only to kill.

    honcho's default sends SIGTERM to the group, which reaches prefork children directly: they
    die mid-task instead of the worker's warm shutdown letting them finish.
    """

    def terminate(self, pid: int) -> None:
        _signal(pid, signal.SIGTERM)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


class _StackManager(Manager):  # type: ignore[misc]
    """honcho's Manager with warm shutdown first and Celery's cold shutdown on a second Ctrl-C."""

    def __init__(self, on_started: Callable[[], None], stopping: threading.Event) -> None:
        super().__init__()
        self._procmgr = _MainProcessSignals()
        self._on_started = on_started
        self._stopping = stopping

    def _start(self) -> None:
        super()._start()
        # honcho's own handlers ignore a second Ctrl-C; ours turn it into Celery's cold shutdown.
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self._on_started()  # after honcho's forks, so no thread of ours is copied into them

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._stopping.is_set():
            self._system_print(f"{name} again: cold shutdown of the workers (running tasks requeued)\n")
            for worker in WORKERS:
                process = self._processes.get(worker, {})
                if "returncode" not in process:
                    _signal(process.get("pid"), signal.SIGQUIT)
            return
        self._stopping.set()
        self._system_print(f"{name} received: warm shutdown, workers finish their running tasks\n")
        self.returncode = 128 + signum
        self.terminate()

    def _killall(self, force: bool = False) -> None:
        if self._all_started():
            super()._killall(force)
            return
        # A signal came before every process reported its PID: signal them as soon as they have.
        threading.Thread(target=self._killall_when_started, args=(force,), daemon=True).start()

    def _killall_when_started(self, force: bool) -> None:
        while not self._all_started():
            time.sleep(0.01)
        super()._killall(force)

    def process_groups(self) -> list[int]:
        """The process group of every process honcho started (each leads its own session)."""
        return [p["pid"] for p in self._processes.values() if p.get("pid")]


def run_stack(stack: Stack, procfile: Path) -> int:
    """Run the stack in the foreground; return the exit code once every process has stopped."""
    commands = parse_procfile(procfile.read_text()).processes
    missing = {"smtp", "email-1", "files", *(["redis"] if stack.redis_server else [])} - set(commands)
    if missing:
        raise StackError(f"{procfile} has no {', '.join(sorted(missing))} process")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    backing: list[subprocess.Popen[bytes]] = []
    try:
        if stack.redis_server:
            backing.append(_start_backing(stack, "redis", commands["redis"], _redis_ready(stack)))
        backing.append(_start_backing(stack, "smtp", commands["smtp"], _port_ready(stack.smtp_port)))
        return _run_celery(stack, {n: c for n, c in commands.items() if n not in BACKING})
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        stack.env_file.unlink(missing_ok=True)
        for proc in reversed(backing):
            _stop(proc)


def _run_celery(stack: Stack, commands: dict[str, str]) -> int:
    """The workers, beat and Flower under honcho, until all of them have stopped."""
    honcho.manager.KILL_WAIT = SHUTDOWN_GRACE  # honcho's default 5 s would cut warm shutdown short
    stopping = threading.Event()
    started = time.monotonic()

    def on_started() -> None:
        threading.Thread(target=_announce_ready, args=(stack, started, stopping), daemon=True).start()

    manager = _StackManager(on_started, stopping)
    for name, command in commands.items():
        manager.add_process(name, command, env=stack.process_env(name))
    try:
        manager.loop()
    finally:
        stopping.set()
        for group in manager.process_groups():
            _MainProcessSignals().kill(group)  # nothing of a group outlives the stack (prefork children)
    return int(manager.returncode or 0)


def _announce_ready(stack: Stack, started: float, stopping: threading.Event) -> None:
    """Wait until both workers answer a ping and Flower answers, then write stack.env and say so."""
    waiting = _wait_ready(stack, stopping)
    if stopping.is_set():
        return
    write_env_file(stack)
    took = time.monotonic() - started
    if waiting:
        print(f"proj up: after {took:.0f} s still no answer from {', '.join(waiting)}", flush=True)
    else:
        print(f"proj up: stack ready in {took:.1f} s; `source {stack.env_file}` to use it", flush=True)


def _wait_ready(stack: Stack, stopping: threading.Event) -> list[str]:
    """What still does not answer when the wait ends (empty when everything is up)."""
    from celery import Celery

    # A bare app on the stack's Redis: proj's own would take its broker from this shell's variables.
    probe = Celery("proj-up", broker=stack.redis_url, set_as_current=False)
    missing = {f"{name}@{socket.gethostname()}" for name in WORKERS}
    flower = False
    deadline = time.monotonic() + READY_TIMEOUT
    while (missing or not flower) and time.monotonic() < deadline and not stopping.is_set():
        if missing:
            for reply in probe.control.ping(destination=sorted(missing), timeout=1.0) or []:
                missing -= set(reply)
        flower = flower or _http_ok(f"{stack.flower_url}/healthcheck")
        if missing or not flower:
            stopping.wait(0.2)
    probe.close()
    return sorted(missing) + ([] if flower else ["flower"])


def _start_backing(
    stack: Stack, name: str, command: str, ready: Callable[[], bool]
) -> subprocess.Popen[bytes]:
    """Start Redis or SMTP in its own session (Ctrl-C must not reach it) and wait until it answers."""
    log = stack.local_dir / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            env=stack.process_env(name),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_backing(proc, name, log, ready)
    except BaseException:  # Ctrl-C while waiting included: it is not in the caller's list yet
        _stop(proc)
        raise
    return proc


def _wait_backing(proc: subprocess.Popen[bytes], name: str, log: Path, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BACKING_TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise StackError(f"{name} did not start (log {log}):\n{tail}")
        time.sleep(0.05)


def _redis_ready(stack: Stack) -> Callable[[], bool]:
    import redis

    client = redis.Redis.from_url(stack.redis_url, socket_connect_timeout=1)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    return ready


def _port_ready(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    return ready


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL to its group if it has not exited within the grace period."""
    _signal(proc.pid, signal.SIGTERM)
    try:
        proc.wait(BACKING_TIMEOUT)
    except subprocess.TimeoutExpired:
        _MainProcessSignals().kill(proc.pid)
        proc.wait(5)


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM before honcho takes over: unwind like Ctrl-C so Redis and SMTP get stopped."""
    raise KeyboardInterrupt
