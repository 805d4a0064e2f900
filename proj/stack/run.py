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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import honcho.manager
from honcho.environ import parse_procfile
from honcho.manager import SYSTEM_PRINTER_NAME, Manager
from honcho.printer import Message
from honcho.process import Popen

from proj.stack.plan import Stack, StackError, write_env_file
from proj.stores.connection import redis_client

# Started before the Celery processes and stopped after them: a worker finishing its tasks on
# Ctrl-C still needs Redis to ack them and SMTP to send the mail they are about.
BACKING = ("redis", "smtp")
# Procfile names of the workers; each runs as <name>@<hostname>.
WORKERS = ("email-1", "email-2", "default-1", "default-2", "files")
# Warm shutdown waits for running tasks, which the hard time limit (300 s) bounds; then SIGKILL.
SHUTDOWN_GRACE = 330
READY_TIMEOUT = 60.0
BACKING_TIMEOUT = 20.0
# A Celery process that exits on its own (a stalled worker exits 75 on purpose) is started again after
# a wait that doubles from 1 s up to 30 s, and is 1 s again once the process had run for 60 s.
RESTART_FIRST_DELAY = 1.0
RESTART_MAX_DELAY = 30.0
RESTART_RESET_AFTER = 60.0
# One that exits this often within the window cannot start: the stack stops rather than loop forever.
GIVE_UP_EXITS = 5
GIVE_UP_WINDOW = 60.0


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


@dataclass
class _Backoff:
    """How long one process waits before it starts again, and when it is given up on."""

    delay: float = RESTART_FIRST_DELAY
    started: float = 0.0  # monotonic time of its last start
    exits: list[float] = field(default_factory=list)

    def next_delay(self, now: float) -> float | None:
        """The wait before starting it again after an exit at `now`; None when it keeps failing."""
        if now - self.started >= RESTART_RESET_AFTER:
            self.delay, self.exits = RESTART_FIRST_DELAY, []
        self.exits = [t for t in self.exits if now - t < GIVE_UP_WINDOW] + [now]
        if len(self.exits) >= GIVE_UP_EXITS:
            return None
        delay, self.delay = self.delay, min(self.delay * 2, RESTART_MAX_DELAY)
        return delay


class _Events:
    """The event queue honcho's loop reads, each event shown first to `inspect`, which may replace it."""

    def __init__(self, queue: Any, inspect: Callable[[Message], Message]) -> None:
        self._queue = queue
        self._inspect = inspect

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        return self._inspect(self._queue.get(block, timeout))


class _StackManager(Manager):  # type: ignore[misc]
    """honcho's Manager with warm shutdown first and Celery's cold shutdown on a second Ctrl-C.

    A process that exits while the stack runs is started again after a backoff instead of stopping
    the stack (honcho's loop never sees that exit), unless it keeps failing right at start.
    """

    events: _Events

    def __init__(self, on_started: Callable[[], None], stopping: threading.Event) -> None:
        super().__init__()
        self._procmgr = _MainProcessSignals()
        self._on_started = on_started
        self._stopping = stopping
        self.events = _Events(self.events, self._on_event)  # honcho's forks inherit it, unpickled
        self._backoff: dict[str, _Backoff] = {}
        self._waiting: dict[str, int] = {}  # exited on their own, to start again: name -> returncode
        # Held while a process starts again and while terminate() begins: either the new PID is in
        # _processes before _killall looks, or the restart sees the shutdown and starts nothing.
        # Reentrant: a Ctrl-C handler can call terminate() while the main thread is inside it.
        self._restarting = threading.RLock()

    def _on_event(self, message: Message) -> Message:
        """Note starts; turn an exit while the stack runs into a restart and one line saying so."""
        name = message.name
        if message.type == "start":
            self._backoff.setdefault(name, _Backoff()).started = time.monotonic()
        if message.type != "stop" or self._shutting_down():
            return message
        code = message.data["returncode"]
        # As a container's end does: nothing of the dead process outlives it (prefork children).
        _MainProcessSignals().kill(self._processes[name]["pid"])
        delay = self._backoff.setdefault(name, _Backoff()).next_delay(time.monotonic())
        if delay is None:
            self._system_print(
                f"{name} exited (rc={code}) {GIVE_UP_EXITS} times within {GIVE_UP_WINDOW:.0f} s: "
                "it cannot start, stopping the stack\n"
            )
            return message  # honcho's loop stops everything, as for any exit before
        self._waiting[name] = code
        threading.Thread(target=self._start_again, args=(name, delay), daemon=True).start()
        return Message(
            "line",
            f"{name} exited (rc={code}); restarting in {delay:.0f} s\n",
            self._clock.now(),
            SYSTEM_PRINTER_NAME,
            None,
        )

    def _start_again(self, name: str, delay: float) -> None:
        """After `delay`, start `name` with its command and environment and relay what it prints."""
        self._stopping.wait(delay)
        process = self._processes[name]["obj"]
        with self._restarting:
            code = self._waiting.pop(name, None)
            if code is None:  # terminate() already counted it as stopped
                return
            if self._shutting_down():
                self._processes[name]["returncode"] = code
                return
            child = Popen(process.cmd, env=process.env, cwd=process.cwd)
            self._processes[name]["pid"] = child.pid
        # What honcho's Process.run does in a forked process, here in this thread.
        self._put(name, "start", {"pid": child.pid})
        for line in iter(child.stdout.readline, b""):
            self._put(name, "line", line)
        child.stdout.close()
        self._put(name, "stop", {"returncode": child.wait()})

    def _shutting_down(self) -> bool:
        # _stopping comes first: a signal sets it, and wakes _start_again, before it calls terminate().
        return self._stopping.is_set() or bool(self._terminating)

    def _put(self, name: str, kind: str, data: object) -> None:
        colour = self._processes[name]["obj"].colour
        self.events.put(Message(kind, data, self._clock.now(), name, colour))

    def terminate(self) -> None:
        with self._restarting:
            while self._waiting:  # not running: nothing to signal, already stopped
                name, code = self._waiting.popitem()
                self._processes[name]["returncode"] = code
            super().terminate()

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
    try:
        waiting = _wait_ready(stack, stopping)
    except Exception:
        if stopping.is_set():  # the stack stopped before it was ready, Redis with it: nothing to say
            return
        raise
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

    client = redis_client(stack.redis_url, socket_connect_timeout=1)

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
