"""Sentinels for the tests, and a producer that runs in a fresh interpreter on a sentinel:// URL.

`python -m tests.faults.sentinel OUT CANARIES EMAILS TIMEOUT` sends the tasks (paced, so a failover
finds it still sending), writes their ids to OUT, then waits for all of them with one deadline and
writes the state of each (celeryconfig reads the sentinel URL at import: hence a new interpreter).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.harness import free_port, redis_binary, stop_process, wait_for

MASTER = "proj-test-master"
READY = ("SUCCESS", "FAILURE", "REVOKED")


class SentinelServer:
    """`redis-server --sentinel` on a free loopback port, watching one master."""

    def __init__(self, master_port: int) -> None:
        self.port = free_port()
        folder = Path(tempfile.mkdtemp(prefix="proj-sentinel-"))
        self.config = folder / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
        )
        log = (folder / "sentinel.log").open("wb")
        self.proc = subprocess.Popen(
            [redis_binary(), str(self.config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), timeout=15, what=f"sentinel on {self.port}")

    def master_port(self) -> int:
        """The port of the master this sentinel names now."""
        return int(redis.Redis(port=self.port).sentinel_get_master_addr_by_name(MASTER)[1])

    def stop(self) -> None:
        stop_process(self.proc)


def sentinel_url(sentinels: list[SentinelServer]) -> str:
    """The sentinel:// URL Celery's users write: every sentinel, `;`-separated."""
    return ";".join(f"sentinel://127.0.0.1:{s.port}/0" for s in sentinels)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _send(app: Any, name: str, task_id: str, **options: Any) -> int:
    """Publish with the given id, again until it is accepted (a failover refuses some); retries made."""
    for attempt in range(120):
        try:
            app.send_task(name, task_id=task_id, **options)
            return attempt
        except Exception:  # the broker is between masters: the same id again, so at most a duplicate
            time.sleep(0.5)
    raise RuntimeError(f"could not publish {task_id}")


def _state(app: Any, task_id: str) -> str:
    try:
        return str(app.AsyncResult(task_id).state)
    except Exception as exc:  # no master right now: ask again in the next round
        return f"ERROR:{type(exc).__name__}"


def produce(out: Path, canaries: int, emails: int, timeout: float) -> None:
    """Send `canaries` and `emails` interleaved, write the ids, wait, write each id's state."""
    from proj.celery import app

    every = max(1, canaries // max(emails, 1))
    plan: dict[str, dict[str, str]] = {"canary": {}, "email": {}}
    retries = 0
    for i in range(canaries):
        task_id = str(uuid.uuid4())
        retries += _send(app, "tasks.health.canary", task_id, args=[0.005])
        plan["canary"][task_id] = ""
        if i % every == 0 and len(plan["email"]) < emails:
            key, task_id = f"failover-{len(plan['email'])}", str(uuid.uuid4())
            kwargs = {"to": f"{key}@example.com", "subject": "s", "text": "t", "idempotency_key": key}
            retries += _send(app, "tasks.email.send_email", task_id, kwargs=kwargs)
            plan["email"][task_id] = key
        if i % 100 == 99:
            time.sleep(0.3)  # paced: about 15 s of sending, so the kill finds the producer at work
    out.write_text(json.dumps({"ids": plan, "publish_retries": retries}))

    deadline = time.monotonic() + timeout
    states = {task_id: "" for kind in plan.values() for task_id in kind}
    while time.monotonic() < deadline:
        waiting = [i for i, s in states.items() if s not in READY]
        if not waiting:
            break
        for task_id in waiting:
            states[task_id] = _state(app, task_id)
        time.sleep(0.5)
    out.write_text(json.dumps({"ids": plan, "publish_retries": retries, "states": states}))
    print(sum(1 for s in states.values() if s == "SUCCESS"))


if __name__ == "__main__":
    produce(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
