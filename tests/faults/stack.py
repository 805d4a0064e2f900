"""A private Redis with its own app and workers, for scenarios that restart, stall or fill Redis."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from proj.mail import message_id_for
from proj.settings import Settings
from tests.conftest import smtp_env
from tests.faults.scenario import Outcome, runs_by_id
from tests.harness import RedisServer, WorkerProcess


@dataclass
class FaultStack:
    """What a scenario drives: the Redis server, an app bound to it, the workers, the mail sink."""

    server: RedisServer
    app: Any
    workers: list[WorkerProcess]
    smtp: Any
    results: list[Any] = field(default_factory=list)
    email_keys: list[str] = field(default_factory=list)
    canary_ids: set[str] = field(default_factory=set)

    def canaries(self, count: int, hold: float = 0.0, **options: Any) -> list[Any]:
        """Send `count` default tasks (`hold` seconds each) and keep their results."""
        sent = [self.app.send_task("tasks.health.canary", args=[hold], **options) for _ in range(count)]
        self.results += sent
        self.canary_ids.update(r.id for r in sent)
        return sent

    def emails(self, count: int, prefix: str) -> list[Any]:
        """Send `count` emails with idempotency keys `prefix-i` and keep their results."""
        keys = [f"{prefix}-{i}" for i in range(count)]
        sent = [
            self.app.send_task(
                "tasks.email.send_email",
                kwargs={
                    "to": f"{prefix}{i}@example.com",
                    "subject": "s",
                    "text": "t",
                    "idempotency_key": key,
                },
            )
            for i, key in enumerate(keys)
        ]
        self.email_keys += keys
        self.results += sent
        return sent

    def outcome(self, name: str, timeout: float, **extra: Any) -> tuple[Outcome, dict[str, Any]]:
        """Wait for every result (bounded), then count what completed, went missing or ran twice."""
        for result in self.results:
            result.get(timeout=timeout, propagate=False)
        failed = [r for r in self.results if r.state != "SUCCESS"]
        inbox = Counter(r.message["Message-ID"] for r in self.smtp.handler.received)
        wanted = {message_id_for(k, Settings()) for k in self.email_keys}
        runs = runs_by_id(*(w.log() for w in self.workers))
        twice = {i: n for i, n in runs.items() if n > 1 and i in self.canary_ids}
        facts = {"failed": failed, "inbox": inbox, "missing": wanted - set(inbox), "twice": twice}
        outcome = Outcome(
            name,
            sent=len(self.results),
            done=len(self.results) - len(failed),
            lost=len(failed) + len(facts["missing"]),
            duplicated=len(twice) + sum(n - 1 for n in inbox.values() if n > 1),
            **extra,
        )
        return outcome, facts

    def alive(self) -> bool:
        return all(w.proc is not None and w.proc.poll() is None for w in self.workers)


@contextmanager
def fault_stack(
    worker_env: dict[str, str],
    smtp_server: Any,
    monkeypatch: Any,
    *redis_args: str,
    env: dict[str, str] | None = None,
) -> Iterator[FaultStack]:
    """Two solo default workers (BLMOVE, inflight lists), two email workers (two queues: unacked records)."""
    from celery import Celery

    server = RedisServer().start(*redis_args)
    url = server.url
    worker_env = {
        **worker_env,
        **smtp_env(smtp_server),
        "REDIS_URL": url,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "BROKER_RESTORE_INTERVAL": "1",
        **(env or {}),
    }
    # An app of its own on this Redis, so the session's app is not disturbed (Celery reads
    # CELERY_BROKER_URL before its configuration); proj's producer parks long delays.
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", url)
    app = Celery("faults", amqp="proj.integration.producer:AMQP", task_cls="proj.integration.requeue:Task")
    app.config_from_object("celeryconfig")
    workers = [
        WorkerProcess(queues="default", name=f"fault-default-{i}", env=worker_env, pool="solo", concurrency=1)
        for i in range(2)
    ] + [WorkerProcess(queues="email,email_bulk", name=f"fault-email-{i}", env=worker_env) for i in range(2)]
    try:
        for worker in workers:
            worker.start(app)
        yield FaultStack(server, app, workers, smtp_server)
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
