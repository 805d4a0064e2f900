"""Email throughput: a naive Celery setup against proj's email workers, to an SMTP server that answers slowly.

The SMTP server (`python -m bench._smtp_sink --delay 0.02`, its own process) waits 20 ms before
every reply, as a real MTA doing DNS and spam checks would, and only counts what it receives, so
the CPU it burns is small next to the client's. Tasks are enqueued first and the workers started
afterwards; the rate is measured between the first and the last received message.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.throughput import procfile_workers

MESSAGES = 2000
QUICK_MESSAGES = 200
DELAY = 0.02
# Replies per message, each delayed: MAIL, RCPT, DATA (354) and the end of data (250) on a reused
# connection; a connection per message adds the greeting, EHLO and QUIT.
REUSED_REPLIES = 4
FRESH_REPLIES = REUSED_REPLIES + 3
BULK_CONNECTIONS = 32
LOGS = Path(tempfile.gettempdir()) / "proj-bench-email"

_PER_REUSED = f"1 / ({REUSED_REPLIES} x {DELAY}) = {1 / (REUSED_REPLIES * DELAY):.1f} messages/s"
_PER_FRESH = f"1 / ({FRESH_REPLIES} x {DELAY}) = {1 / (FRESH_REPLIES * DELAY):.1f}"

NOTES = f"""\
- SMTP server: `python -m bench._smtp_sink --delay {DELAY}` in its own process: a minimal asyncio
  SMTP server that waits {DELAY * 1000:.0f} ms before every reply (greeting, EHLO, MAIL, RCPT, DATA's 354
  and the final 250, QUIT) and counts messages and distinct Message-IDs instead of storing them
  (the run checks that proj delivered each message exactly once). A reused connection carries
  at most {_PER_REUSED}, a connection per message {_PER_FRESH}. The bound of
  a setup is that times its parallel connections (processes, threads or bulk connections).
- Naive: `bench/_naive_email.py`, a stock `Celery()` app whose task opens one SMTP connection per
  message, run by `celery -A bench._naive_email worker` with every default (prefork, one process
  per core).
- proj: the `email-N` lines of the `Procfile` as they are (`celery -A proj worker -Q
  email,email_bulk -P threads -c 16 -n email-N@%h ... -l INFO`, one process per core, all started
  together); `send_email` reuses one connection per thread and records each message in the
  idempotency ledger before and after the SMTP transaction, so its bound counts processes x
  threads connections; `send_bulk` sends all messages in one task (so in one of the processes)
  over {BULK_CONNECTIONS} connections at a time (`EMAIL_BULK_CONNECTIONS={BULK_CONNECTIONS}`), each
  carrying a chunk of up to 50 messages.
- Peak RSS: the whole process trees of the workers together, sampled every 0.1 s during the run.
"""


@dataclass
class Setup:
    """One way of sending the messages: how to start the worker, how to enqueue, how parallel it is."""

    label: str
    workers: list[list[str]]  # `celery worker` arguments of each process of the setup
    enqueue: Callable[[int], None]
    connections: int
    replies: int = REUSED_REPLIES
    connections_how: str = ""  # how `connections` comes about, for the bound's label
    env: dict[str, str] = field(default_factory=dict)


def _naive_enqueue(n: int) -> None:
    from bench._naive_email import app

    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(
                "bench._naive_email.send_email",
                kwargs={"to": f"user{i}@example.com", "subject": f"Message {i}", "text": "Hello"},
                producer=producer,
            )


def _proj_enqueue(n: int) -> None:
    from proj.celery import app

    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(
                "tasks.email.send_email",
                kwargs={"to": f"user{i}@example.com", "subject": f"Message {i}", "text": "Hello"},
                producer=producer,
            )


def _bulk_enqueue(n: int) -> None:
    from proj.celery import app

    context = {"product": "Proj", "url": "https://example.com"}
    recipients = [{"to": f"user{i}@example.com", "context": {**context, "name": f"U{i}"}} for i in range(n)]
    app.send_task("tasks.email.send_bulk", kwargs={"template": "welcome", "recipients": recipients})


def email_workers() -> list[list[str]]:
    """The `celery worker` arguments of each Procfile worker that consumes `email`."""
    return [args for args in procfile_workers().values() if "email" in args[args.index("-Q") + 1].split(",")]


def _connections(workers: list[list[str]]) -> int:
    """Parallel SMTP conversations of threads-pool workers: each thread keeps one connection."""
    return sum(int(args[args.index("-c") + 1]) for args in workers)


def setups() -> list[Setup]:
    """The naive baseline first: ratios are against it."""
    proj = email_workers()
    return [
        Setup(
            "naive: stock prefork, connection per message",
            [["-l", "WARNING"]],
            _naive_enqueue,
            os.cpu_count() or 1,
            FRESH_REPLIES,
        ),
        Setup(
            "proj email workers: send_email",
            proj,
            _proj_enqueue,
            _connections(proj),
            connections_how=" + ".join(args[args.index("-c") + 1] for args in proj) + " threads = ",
        ),
        Setup(
            "proj email workers: send_bulk",
            proj,
            _bulk_enqueue,
            BULK_CONNECTIONS,
            env={"EMAIL_BULK_CONNECTIONS": str(BULK_CONNECTIONS)},
        ),
    ]


def _start_smtp(stats: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The slow SMTP server in its own process, ready to accept connections."""
    port = common.free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench._smtp_sink",
        "--port",
        str(port),
        "--delay",
        str(DELAY),
        "--stats",
        str(stats),
    ]
    proc = common.spawn(cmd, dict(os.environ), LOGS / "smtp.log")

    def accepting() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    common.wait_for(accepting, timeout=20, what="the SMTP server")
    return proc, port


def _measure(setup: Setup, redis_url: str, n: int) -> dict[str, float]:
    """Enqueue n messages, start the worker, wait for n received messages: rate and peak RSS."""
    stats = Path(tempfile.mkdtemp(prefix="bench-mail-")) / "stats.json"
    smtp, port = _start_smtp(stats)
    naive = setup.label.startswith("naive")
    env = common.child_env(redis_url, SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), **setup.env)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        setup.enqueue(n)
        for index, args in enumerate(setup.workers, 1):
            command = common.celery_worker("bench._naive_email" if naive else "proj", *args)
            workers.append(common.spawn(command, env, LOGS / f"worker-{index}.log"))
        peak = _wait_for_messages(stats, n, [worker.pid for worker in workers])
    finally:
        common.stop([*workers, smtp])
    counts = _read(stats)
    if counts["messages"] != n or (not naive and counts["message_ids"] != n):
        raise RuntimeError(f"expected {n} messages once each, the server counted {counts}")
    return {"rate": (n - 1) / (counts["last"] - counts["first"]), "rss": peak}


def _read(stats: Path) -> dict[str, float]:
    try:
        return dict(json.loads(stats.read_text()))
    except (OSError, ValueError):  # not written yet
        return {"messages": 0, "message_ids": 0, "first": 0.0, "last": 0.0}


def _wait_for_messages(stats: Path, n: int, pids: list[int], timeout: float = 600) -> float:
    """Poll until n messages arrived; return the workers' trees' peak RSS in MiB meanwhile."""
    deadline, peak = time.monotonic() + timeout, 0.0
    while _read(stats)["messages"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only part of {n} messages arrived in {timeout}s; see {LOGS}")
        peak = max(peak, common.tree_rss(pids)["total"])
        time.sleep(0.1)
    time.sleep(0.5)  # a duplicate would arrive now
    return peak


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """Every setup on the same Redis and the same slow SMTP server; ratios against the naive one."""
    n = QUICK_MESSAGES if quick else MESSAGES
    rows: list[common.Row] = []
    baseline = 0.0
    for setup in setups():
        common.flush(redis_url)
        measured = _measure(setup, redis_url, n)
        per_connection = 1 / (setup.replies * DELAY)
        bound = setup.connections * per_connection
        rows += [
            common.row(setup.label, "messages per second", measured["rate"], "msg/s"),
            common.row(
                setup.label,
                f"bound: {setup.connections_how}{setup.connections} connections x {per_connection:.1f}/s",
                bound,
                "msg/s",
            ),
            common.row(setup.label, "fraction of the bound", 100 * measured["rate"] / bound, "%"),
            common.row(setup.label, "worker peak RSS", measured["rss"], "MiB"),
        ]
        if baseline:
            rows.append(common.ratio(setup.label, "speed-up over naive", measured["rate"], baseline))
        else:
            baseline = measured["rate"]
    return rows


def main(argv: list[str] | None = None) -> Any:
    """`python -m bench.email [--quick]`."""
    common.standalone("email", run)


if __name__ == "__main__":
    main()
