"""Throughput and latency of proj's Celery configuration against stock Celery defaults."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import common

NOTES = """\
- `redis-py LPUSH+BRPOP floor`: one redis-py client pushes a message and pops it back on one
  connection: the cost of the two broker round trips every task needs, with no Celery at all.
"""

# Worker options every proj worker runs with (README, Procfile): no start-up cluster chatter.
PROJ_FLAGS = ("--without-mingle", "--without-gossip")
BENCH_TASKS = "bench._projtasks"
LOGS = Path(tempfile.gettempdir()) / "proj-bench"


@dataclass
class Config:
    """How a set of worker processes is started and how to tell that a drain has finished."""

    label: str
    app: str  # "proj" or "stock"
    workers: list[list[str]]  # worker arguments after `celery -A <app> worker`
    queue: str = "default"
    acks_late: bool = True
    env: dict[str, str] = field(default_factory=dict)

    def commands(self) -> list[list[str]]:
        """Full command lines."""
        module = "proj" if self.app == "proj" else "bench._stock"
        return [common.celery_worker(module, *args) for args in self.workers]


def stock_config() -> Config:
    """Stock Celery: `celery -A app worker`, every default."""
    return Config("stock Celery defaults", "stock", [["-l", "WARNING"]], queue="celery", acks_late=False)


def proj_worker(name: str, pool: str, concurrency: int, *extra: str, include: str = "") -> list[str]:
    """One proj worker consuming the short-task queue, with the benchmark tasks loaded."""
    modules = ",".join(filter(None, (BENCH_TASKS, include)))
    return ["-Q", "default", "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h", *PROJ_FLAGS,
            "-I", modules, *extra]


# --- (a) drain -------------------------------------------------------------------------------

def _enqueue(config: Config, redis_url: str, n: int) -> list[str]:
    """Pre-enqueue n short tasks with the bulk helper; the ids of the last few."""
    from celery import Celery

    from proj.bulk import enqueue_many

    if config.app == "proj":
        from bench import _projtasks

        signatures = [_projtasks.noop.s() for _ in range(n)]
    else:
        # A producer-only twin of the stock app: same messages, but no result subscriptions here.
        producer = Celery("stock-producer", broker=redis_url)
        signatures = [producer.signature("bench._stock.noop") for _ in range(n)]
    return [result.id for result in enqueue_many(signatures)[-64:]]


def _drained(client: redis.Redis, config: Config, tail: list[str]) -> bool:
    """Every task has run: nothing queued, nothing unacked, and (results on) the last results stored."""
    if client.llen(config.queue) or client.hlen("unacked"):
        return False
    if config.acks_late:
        return True
    return bool(client.exists(*(f"celery-task-meta-{task_id}" for task_id in tail)) == len(tail))


def drain(config: Config, redis_url: str, n: int) -> dict[str, float]:
    """(a) Start the workers on n pre-enqueued tasks; tasks/s, CPU µs per task and RSS."""
    common.flush(redis_url)
    tail = _enqueue(config, redis_url, n)
    client = redis.Redis.from_url(redis_url)
    procs = [common.spawn(cmd, common.child_env(redis_url, **config.env), LOGS / f"{config.label}-{i}.log")
             for i, cmd in enumerate(config.commands())]
    try:
        common.wait_for(lambda: client.llen(config.queue) < n, timeout=60, interval=0.001,
                        what=f"{config.label} to start consuming")
        started, cpu0 = time.perf_counter(), common.tree_cpu(p.pid for p in procs)
        common.wait_for(lambda: _drained(client, config, tail) and _drained(client, config, tail),
                        timeout=600, interval=0.005, what=f"{config.label} to drain {n} tasks")
        elapsed, cpu = time.perf_counter() - started, common.tree_cpu(p.pid for p in procs) - cpu0
        rss = common.tree_rss(p.pid for p in procs)
    finally:
        common.stop(procs)
        client.close()
    return {"per_second": n / elapsed, "cpu_us": cpu / n * 1e6, "rss": rss["total"]}


# --- (b), (c) producers ------------------------------------------------------------------------

def producer(mode: str, app: str, n: int, redis_url: str) -> dict[str, float]:
    """Run bench._producer in a fresh process and return its figures."""
    out = subprocess.run([sys.executable, "-m", "bench._producer", mode, app, str(n)],
                         cwd=common.ROOT, env=common.child_env(redis_url), capture_output=True,
                         text=True, timeout=600, check=False)
    if out.returncode:
        raise RuntimeError(f"bench._producer {mode} {app} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- (d) floor ---------------------------------------------------------------------------------

def broker_floor(redis_url: str, n: int) -> list[common.Row]:
    """(d) LPUSH+BRPOP pairs per second from one redis-py connection."""
    client = redis.Redis.from_url(redis_url)
    payload = b'{"task": "noop"}' * 8
    started = time.perf_counter()
    for _ in range(n):
        client.lpush("bench.floor", payload)
        client.brpop(["bench.floor"], timeout=1)
    elapsed = time.perf_counter() - started
    client.close()
    return [common.row("redis-py LPUSH+BRPOP floor", "pairs/s", n / elapsed, "1/s"),
            common.row("redis-py LPUSH+BRPOP floor", "round trip", elapsed / n * 1e6 / 2, "µs")]


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """Every throughput and latency scenario, once."""
    return broker_floor(redis_url, 2_000 if quick else 20_000)


if __name__ == "__main__":
    common.standalone("throughput", run)
