"""A worker whose consumer stops consuming is noticed, exits non-zero, and its backlog drains after a restart.

The stall: a TCP proxy between the worker and the private Redis black-holes every connection that
sends BLMOVE or BRPOP (the consumer's blocking take): from then on nothing it sends arrives and the
sockets stay open, as behind a network stall. Every other connection of the worker (pub/sub,
acks, results, the watchdog's own reads) works. kombu 5.7 drops a blocking connection whose reply is
overdue by brpop_timeout + health_check_interval (11 s here) and connects again, so a one-time black
hole would heal by itself; this one black-holes the new connection too, which is the stall that
outlasts every timeout the watchdog is there for.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from proj.integration.watchdog import STALLED_EXIT_CODE, StallWatch
from proj.stores.queues import queue_stats
from tests.faults.scenario import Outcome, report
from tests.harness import ROOT, wait_for

# Not stock_too: the watchdog is the same code in both modes, and each stall costs time (the
# worker's close waits out the socket timeout of the black-holed take); the suite's time is kept.
pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

WINDOW = 6.0  # seconds; the watchdog checks every second
BLOCKING = (b"BLMOVE", b"BRPOP")
CANARY = "tasks.health.canary"


class _Pair:
    """One proxied connection: the worker's socket, Redis's socket, and whether it is black-holed."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.blocking = False  # has sent a blocking take
        self.holed = False


class BlackHoleProxy:
    """127.0.0.1 TCP proxy to Redis that can black-hole what the worker sends on blocking connections.

    Only the worker's side is dropped: a reply already on its way (a take sent before the hole opened)
    still arrives, so no message is taken and then lost in the hole (with kombu's own BRPOP it would be).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[_Pair] = []
        self.holing = False
        self.swallowed = 0  # blocking takes dropped by the hole
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> BlackHoleProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def hole_blocking(self) -> None:
        """From now on, drop whatever the worker sends on a connection that takes with BLMOVE/BRPOP."""
        with self.lock:
            self.holing = True
            for pair in self.pairs:
                pair.holed = pair.holed or pair.blocking

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for pair in self.pairs:
                for sock in (pair.client, pair.upstream):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            pair = _Pair(client, upstream)
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, upstream, client, False), daemon=True).start()

    def _pump(self, pair: _Pair, source: socket.socket, target: socket.socket, outbound: bool) -> None:
        try:
            while data := source.recv(65536):
                if outbound:
                    with self.lock:
                        if any(command in data.upper() for command in BLOCKING):
                            pair.blocking = True
                            pair.holed = pair.holed or self.holing
                            self.swallowed += pair.holed
                        if pair.holed:
                            continue  # a black hole reads and drops, and never closes
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy(redis_server: Any) -> Any:
    hole = BlackHoleProxy(redis_server.port).start()
    yield hole
    hole.close()


def _status_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proj.cli.main", "status", "--check", *args],
        cwd=ROOT,
        env={**env, "PROJ_STALL_WINDOW": str(WINDOW)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _succeeded(log: str) -> dict[str, int]:
    """How often each task id ran to completion, from a worker log."""
    counts: dict[str, int] = {}
    for task_id in re.findall(r"Task [\w.]+\[([0-9a-f-]{36})\] succeeded", log):
        counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def _stall_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Consumer stalled" in line]


def test_stall_watch_needs_a_whole_window_of_waiting_with_nothing_received_and_a_free_slot():
    watch = StallWatch(window=6)
    assert watch.observe(0, received=0, free=True, depths={"q": 0}) == (["q"], [])
    assert watch.observe(1, received=0, free=True, depths={"q": 3}) == ([], [])  # waits since 1
    assert watch.observe(6, received=0, free=True, depths={"q": 3}) == ([], [])
    assert watch.observe(7, received=0, free=True, depths={"q": 3}) == ([], ["q"])
    assert watch.observe(8, received=1, free=True, depths={"q": 3}) == (["q"], [])  # took one
    assert watch.observe(9, received=1, free=False, depths={"q": 3}) == (["q"], [])  # busy
    assert watch.observe(20, received=1, free=False, depths={"q": 3}) == (["q"], [])
    assert watch.observe(21, received=1, free=True, depths={"q": 3}) == ([], [])  # waits since 21
    watch.reset()  # Redis could not be read: start again
    assert watch.observe(27, received=1, free=True, depths={"q": 3}) == ([], [])
    assert watch.observe(33, received=1, free=True, depths={"q": 3}) == ([], ["q"])


@pytest.mark.timeout(300)  # a window, the 30 s socket timeout of the shutdown, a restart, on a busy machine
# threads (email) and prefork (files); solo (default) shares the threads pool's consumer loop.
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_stalled_consumer_exits_and_a_new_worker_drains_the_backlog(
    pool, start_worker, celery_app, worker_env, redis_client, proxy
):
    stalled = start_worker(
        "default",
        pool=pool,
        concurrency=2 if pool == "threads" else 1,
        # A short socket timeout: the stalled worker's close waits it out on the black-holed take.
        env={"CELERY_BROKER_URL": proxy.url, "PROJ_STALL_WINDOW": str(WINDOW), "BROKER_SOCKET_TIMEOUT": "5"},
    )
    assert celery_app.send_task(CANARY).get(timeout=30)["hostname"] == stalled.nodename
    assert _status_check(worker_env, "--queues", "default").returncode == 0

    proxy.hole_blocking()
    # The take that was at Redis when the hole opened has had its (empty) reply: the next one is lost.
    wait_for(lambda: proxy.swallowed >= 1, timeout=10, what="the hole to swallow a blocking take")
    holed_at = time.monotonic()
    results = [celery_app.send_task(CANARY) for _ in range(10)]

    proc = stalled.proc
    assert proc is not None
    wait_for(lambda: proc.poll() is not None, timeout=90, interval=0.2, what="the stalled worker to exit")
    detected_in = time.monotonic() - holed_at
    log = stalled.log()
    assert proc.returncode == STALLED_EXIT_CODE, log[-3000:]
    (line,) = _stall_lines(log)
    assert re.search(r"ERROR.*Consumer stalled: queue default \(10 message\(s\) waiting", line), line

    # Nothing consumes `default` now: the health check says so, naming the queue.
    check = wait_for(
        lambda: (proc := _status_check(worker_env, "--queues", "default")).returncode == 1 and proc,
        timeout=30,
        interval=0.5,
        what="proj status --check to report the stall",
    )
    assert check.stdout.startswith("stalled: default: 10 waiting"), check.stdout

    # The supervisor's part: start the worker again (here without the proxy).
    restarted = start_worker("default", pool=pool, env={"PROJ_STALL_WINDOW": str(WINDOW)})
    answers = [result.get(timeout=60) for result in results]
    resumed_in = time.monotonic() - holed_at
    assert {answer["hostname"] for answer in answers} == {restarted.nodename}
    assert all(result.status == "SUCCESS" for result in results)
    ids = {result.id for result in results}
    runs = _succeeded(log + restarted.log())
    assert {task_id: runs.get(task_id, 0) for task_id in ids} == dict.fromkeys(ids, 1)
    assert _status_check(worker_env, "--queues", "default").returncode == 0
    report(
        Outcome(
            f"stalled consumer ({pool})",
            sent=len(results),
            done=len(answers),
            lost=len(ids) - len([i for i in ids if runs.get(i)]),
            duplicated=sum(1 for i in ids if runs.get(i, 0) > 1),
            resumed_in=resumed_in,
            note=f"window {WINDOW:g} s, exited {STALLED_EXIT_CODE} after {detected_in:.1f} s",
        )
    )


@pytest.mark.parametrize("pool", ["solo"])
def test_worker_busy_with_long_tasks_is_not_stalled(pool, start_worker, celery_app, worker_env, redis_client):
    slots = 2 if pool == "threads" else 1
    worker = start_worker("default", pool=pool, concurrency=slots, env={"PROJ_STALL_WINDOW": str(WINDOW)})
    long = [celery_app.send_task(CANARY, kwargs={"hold": WINDOW * 2.5}) for _ in range(slots)]
    wait_for(lambda: redis_client.llen("default") == 0, what="the worker to take the long tasks")
    waiting = [celery_app.send_task(CANARY) for _ in range(3)]

    # A whole window and then some with every slot taken and messages waiting.
    wait_for(
        lambda: (queue_stats(redis_client, ["default"])[0].oldest_age or 0) > WINDOW + 2,
        timeout=30,
        what="the waiting messages to outlast a window",
    )
    check = _status_check(worker_env, "--queues", "default")
    assert check.returncode == 0, check.stdout
    assert worker.proc is not None and worker.proc.poll() is None

    assert all(result.get(timeout=60)["hostname"] == worker.nodename for result in [*long, *waiting])
    assert worker.proc.poll() is None and not _stall_lines(worker.log())


def test_client_kill_of_the_blocking_connection_heals_without_the_watchdog(
    start_worker, celery_app, worker_env, redis_client
):
    """CLIENT KILL of the consumer's blocking connection: kombu reads a connection error, Celery's
    consumer logs "Connection to broker lost" and connects again, and the worker keeps consuming in
    the same process; the watchdog has nothing to do (a closed socket is noticed, a silent one is not).
    """
    worker = start_worker("default", concurrency=2, env={"PROJ_STALL_WINDOW": str(WINDOW)})
    assert celery_app.send_task(CANARY).get(timeout=30)["hostname"] == worker.nodename

    def blocked_clients() -> list[dict[str, Any]]:
        # Blocked right now ("b"): the worker's take, not this process's idle reply consumer.
        clients = redis_client.client_list()
        return [c for c in clients if c.get("cmd") in ("blmove", "brpop") and "b" in c.get("flags", "")]

    (victim,) = wait_for(blocked_clients, what="the consumer's blocking connection")
    redis_client.client_kill_filter(_id=victim["id"])
    results = [celery_app.send_task(CANARY) for _ in range(5)]

    assert all(result.get(timeout=60)["hostname"] == worker.nodename for result in results)
    assert worker.proc is not None and worker.proc.poll() is None
    log = worker.log()
    assert not _stall_lines(log)
    assert "Connection to broker lost" in log
    assert worker.stop(signal.SIGTERM) == 0
