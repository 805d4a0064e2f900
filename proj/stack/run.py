"""Running the local stack: Redis and SMTP first, the Celery processes under honcho, shutdown in order.

The terminal shows a few lines (proj.stack.view); each process's output goes to .local/logs/. Nothing
started outlives `proj up`, however it ends (proj.stack.lifeline).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import honcho.manager
import honcho.process
from honcho.environ import parse_procfile
from honcho.manager import SYSTEM_PRINTER_NAME, Manager
from honcho.printer import Message

from proj.credentials import scrub
from proj.stack.lifeline import Lifeline, die_with_parent, preexec_die_with_parent
from proj.stack.plan import Stack, StackError, banner, write_env_file
from proj.stack.view import LiveView
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
# Beat answers no ping: it is ready once it says so (Procfile: -l INFO).
READY_LINES = {"beat": b"beat: Starting..."}
# Exit codes of a process that stopped as asked (SIGTERM honoured, or its own handler's 0).
STOPPED_AS_ASKED = (0, -signal.SIGTERM, 128 + signal.SIGTERM)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WAITING_STOPPED = "stopped (it was waiting to start again)"


class _Popen(honcho.process.Popen):  # type: ignore[misc]
    """honcho's Popen (own session, output piped), killed by the kernel when its starter dies."""

    def __init__(self, cmd: str, **kwargs: Any) -> None:
        super().__init__(cmd, preexec_fn=preexec_die_with_parent(), **kwargs)


class _Relay(honcho.process.Process):  # type: ignore[misc]
    """honcho's relay (a forked process that runs one command and forwards its output), made to die
    with `proj up` and to leave a closed terminal's SIGHUP to `proj up`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._child_ctor = _Popen
        self._parent = os.getpid()
        self.lifeline_fd = -1

    def run(self, events: Any = None, ignore_signals: bool = False) -> None:
        die_with_parent(self._parent)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self.lifeline_fd >= 0:  # inherited by the fork: the watcher must see EOF when proj up dies
            with contextlib.suppress(OSError):
                os.close(self.lifeline_fd)
        super().run(events, ignore_signals)


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

    def __init__(self, queue: Any, inspect: Callable[[Message], Message], idle: Callable[[], None]) -> None:
        self._queue = queue
        self._inspect = inspect
        self._idle = idle  # run before each wait: honcho's loop asks at least every 0.1 s

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        self._idle()
        return self._inspect(self._queue.get(block, timeout))


class _StackManager(Manager):  # type: ignore[misc]
    """honcho's Manager with warm shutdown first and Celery's cold shutdown on a second Ctrl-C.

    A process that exits while the stack runs is started again after a backoff instead of stopping
    the stack (honcho's loop never sees that exit), unless it keeps failing right at start.
    """

    events: _Events

    def __init__(
        self, on_started: Callable[[], None], stopping: threading.Event, view: LiveView, lifeline: Lifeline
    ) -> None:
        super().__init__(printer=view)
        self._view = view
        self._lifeline = lifeline
        self._process_ctor = _Relay
        self._procmgr = _MainProcessSignals()
        self._on_started = on_started
        self._stopping = stopping
        self._signalled: deque[int] = deque()  # stop signals the main loop has not acted on yet
        # honcho's forks inherit it, unpickled
        self.events = _Events(self.events, self._on_event, self._act_on_signals)
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
            self._lifeline.hold(message.data["pid"])
            self._view.append(name, f"--- proj up: started (pid={message.data['pid']})\n".encode())
            if name not in WORKERS and name not in ("flower", *READY_LINES):
                self._view.ready(name, "started")  # no way to ask it: running is all there is to say
        if message.type != "stop":
            return message
        code = message.data["returncode"]
        # As a container's end does: nothing of the dead process outlives it (prefork children).
        _MainProcessSignals().kill(self._processes[name]["pid"])
        self._lifeline.release(self._processes[name]["pid"])
        self._view.append(name, f"--- proj up: exited (rc={code})\n".encode())
        if self._shutting_down():
            self._view.process(name, _stopped(code, self._view.log_path(name)))
            return message
        delay = self._backoff.setdefault(name, _Backoff()).next_delay(time.monotonic())
        if delay is None:
            self._view.say(
                f"proj up: {name} exited (rc={code}) {GIVE_UP_EXITS} times within {GIVE_UP_WINDOW:.0f} s: "
                f"it cannot start, stopping the stack (its output: {self._view.log_path(name)})"
            )
            return message  # honcho's loop stops everything, as for any exit before
        self._waiting[name] = code
        threading.Thread(target=self._start_again, args=(name, delay), daemon=True).start()
        self._view.say(
            f"proj up: {name} exited (rc={code}); restarting in {delay:.0f} s "
            f"(its output: {self._view.log_path(name)})"
        )
        return Message("line", f"{name} exited (rc={code})\n", self._clock.now(), SYSTEM_PRINTER_NAME, None)

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
                self._view.process(name, WAITING_STOPPED)
                return
            # From this thread, which lives as long as the child: the kernel's parent for PDEATHSIG.
            child = _Popen(process.cmd, env=process.env, cwd=process.cwd)
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
                self._view.process(name, WAITING_STOPPED)
            super().terminate()

    def _start(self) -> None:
        for entry in self._processes.values():
            entry["obj"].lifeline_fd = self._lifeline.fd
        super()._start()
        # honcho's own handlers ignore a second Ctrl-C; ours turn it into Celery's cold shutdown.
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self._on_started()  # after honcho's forks, so no thread of ours is copied into them

    def _on_signal(self, signum: int, frame: object) -> None:
        """Only note the signal; the main loop acts on it. A handler that printed or stopped processes
        ran inside whatever it interrupted: holding the live view's lock, the main thread then waited
        for the restart lock, held by a restarting thread that waited for the view's lock (a hang)."""
        self._signalled.append(signum)

    def _act_on_signals(self) -> None:
        """Between two events of honcho's loop: warm shutdown on the first signal, cold on the next."""
        while self._signalled:
            self._stop_for(self._signalled.popleft())

    def _stop_for(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping.is_set():
            self._view.say(f"proj up: {name} again: cold shutdown of the workers (running tasks requeued)")
            for worker in WORKERS:
                process = self._processes.get(worker, {})
                if "returncode" not in process:
                    _signal(process.get("pid"), signal.SIGQUIT)
            return
        self._stopping.set()
        self._view.say(f"proj up: {name} received: warm shutdown, workers finish their running tasks")
        self.returncode = 0  # stopping as asked is a success: `make run` reports no error
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
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    view = LiveView(stack.logs_dir, ready_lines=READY_LINES)
    with (stack.logs_dir / "lifeline.log").open("ab") as lifeline_log:
        lifeline = Lifeline(stack.env_file, lifeline_log)
    backing: list[tuple[str, subprocess.Popen[bytes]]] = []
    view.say(f"proj up: starting the local stack; each process's output goes to {stack.logs_dir}/<name>.log")
    try:
        if stack.redis_server:
            proc = _start_backing(stack, view, lifeline, "redis", commands["redis"], _redis_ready(stack))
            backing.append(("redis", proc))
            view.ready("redis", stack.redis_url)
        proc = _start_backing(stack, view, lifeline, "smtp", commands["smtp"], _port_ready(stack.smtp_port))
        backing.append(("smtp", proc))
        view.ready("smtp", f"127.0.0.1:{stack.smtp_port}")
        return _run_celery(stack, view, lifeline, {n: c for n, c in commands.items() if n not in BACKING})
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, SIGHUP) before the Celery processes started
        view.say("proj up: stopping")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stack.env_file.unlink(missing_ok=True)
        for name, proc in reversed(backing):
            code = _stop(proc)
            lifeline.release(proc.pid)
            view.process(name, _stopped(code, view.log_path(name)))
        lifeline.done()
        view.say("proj up: stopped")
        view.close()


def _run_celery(stack: Stack, view: LiveView, lifeline: Lifeline, commands: dict[str, str]) -> int:
    """The workers, beat and Flower under honcho, until all of them have stopped."""
    honcho.manager.KILL_WAIT = SHUTDOWN_GRACE  # honcho's default 5 s would cut warm shutdown short
    stopping = threading.Event()
    started = time.monotonic()

    def on_started() -> None:
        threading.Thread(
            target=_announce_ready, args=(stack, view, list(commands), started, stopping), daemon=True
        ).start()

    manager = _StackManager(on_started, stopping, view, lifeline)
    for name, command in commands.items():
        manager.add_process(name, command, env=stack.process_env(name))
    try:
        manager.loop()
    finally:
        stopping.set()
        for group in manager.process_groups():
            _MainProcessSignals().kill(group)  # nothing of a group outlives the stack (prefork children)
            lifeline.release(group)
    return int(manager.returncode or 0)


def _stopped(code: int | None, log: Path) -> str:
    """How one process ended, for the line shown when the stack stops."""
    if code in STOPPED_AS_ASKED:
        return "stopped"
    if code == -signal.SIGKILL:
        return f"killed (did not stop within the grace period; its output: {log})"
    return f"stopped (rc={code}; its output: {log})"


def _announce_ready(
    stack: Stack, view: LiveView, names: list[str], started: float, stopping: threading.Event
) -> None:
    """One line per process as it answers, then the summary; stack.env is written then."""
    try:
        _wait_ready(stack, view, names, stopping)
    except Exception as exc:  # Redis gone meanwhile: one line, the processes' logs tell the rest
        if not stopping.is_set():
            view.say(f"proj up: cannot tell whether the stack is ready: {scrub(str(exc))}")
        return
    if stopping.is_set():
        return
    took = time.monotonic() - started
    waiting = [name for name in names if not view.is_ready(name) and name not in READY_LINES]
    if waiting:
        view.say(
            f"proj up: after {took:.0f} s still no answer from {', '.join(waiting)}; "
            f"see {stack.logs_dir}/<name>.log"
        )
    else:
        view.say(f"proj up: stack ready in {took:.1f} s")
    view.say(banner(stack))
    write_env_file(stack)


def _wait_ready(stack: Stack, view: LiveView, names: list[str], stopping: threading.Event) -> None:
    """Until every worker answers a ping and Flower its health check, or READY_TIMEOUT."""
    from celery import Celery

    # A bare app on the stack's broker: proj's own would take its broker from this shell's variables.
    probe = Celery("proj-up", broker=stack.broker_url, set_as_current=False)
    if stack.broker_url.startswith("sentinel://"):
        probe.conf.broker_transport_options = {"master_name": stack.sentinel_master}
    host = socket.gethostname()
    missing = {f"{name}@{host}" for name in WORKERS if name in names}
    flower = "flower" not in names
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while (missing or not flower) and time.monotonic() < deadline and not stopping.is_set():
            if missing:
                for reply in probe.control.ping(destination=sorted(missing), timeout=1.0) or []:
                    for node in set(reply) & missing:
                        missing.discard(node)
                        view.ready(node.split("@")[0])
            if not flower and _http_ok(f"{stack.flower_url}/healthcheck"):
                flower = True
                view.ready("flower", stack.flower_url)
            if missing or not flower:
                stopping.wait(0.2)
    finally:
        probe.close()


def _start_backing(
    stack: Stack, view: LiveView, lifeline: Lifeline, name: str, command: str, ready: Callable[[], bool]
) -> subprocess.Popen[bytes]:
    """Start Redis or SMTP in its own session (Ctrl-C must not reach it) and wait until it answers."""
    log = view.log_path(name)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            env=stack.process_env(name),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_die_with_parent(),
        )
    lifeline.hold(proc.pid)
    try:
        _wait_backing(proc, name, log, ready)
    except BaseException:  # Ctrl-C while waiting included: it is not in the caller's list yet
        _stop(proc)
        lifeline.release(proc.pid)
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


def _stop(proc: subprocess.Popen[Any]) -> int | None:
    """SIGTERM, then SIGKILL to its group if it has not exited within the grace period; its exit code."""
    _signal(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(BACKING_TIMEOUT)
    except subprocess.TimeoutExpired:
        _MainProcessSignals().kill(proc.pid)
        return proc.wait(5)


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP before honcho takes over: unwind like Ctrl-C so Redis and SMTP get stopped."""
    raise KeyboardInterrupt
