"""Throughput and latency of proj's Celery configuration against stock Celery defaults."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import common
from proj.stores.inflight import InflightLists

NOTES = """\
- Stock: `bench/_stock.py`, `Celery("stock", broker=url, backend=url)` and a no-op task, run by
  `celery -A bench._stock worker -n stock@%h -l WARNING`: prefork with one child per core,
  prefetch multiplier 4, acks early, results stored, no task events, mingle/gossip/heartbeat on.
- proj: the `default-N` lines of the `Procfile` as they are (`-P solo`, one process per core,
  `-l WARNING`), plus `-I bench._projtasks` for the benchmark tasks: `tasks.bench.noop`
  (`ignore_result=True`, routed to `default`), `tasks.bench.echo` (`track_started=False`).
  proj's configuration as shipped: acks late, task events on, `task-sent` events on, JSON only.
- (a) drain: the workers start and answer a ping, are told to stop consuming (`cancel_consumer`),
  the tasks are enqueued with `enqueue_many`, and the clock starts when they are told
  to consume again (`add_consumer`); it stops when the queue and the unacked set are empty (and,
  for stock, the last results are stored). Start-up is neither timed nor counted. CPU per task:
  user + system time of the worker process trees (psutil) over the same window, divided by the
  number of tasks.
- (a') the same drain with one of proj's changes undone: kombu's own transport
  (`-I bench._kombu_transport`), kombu's BRPOP + unacked record instead of proj's BLMOVE into an
  inflight list (`-I bench._brpop_consume`), per-turn event flushing (`-I bench._per_turn_events`), a task
  that stores its result and STARTED state (`tasks.bench.noop_result`), `-l INFO`, or the same
  processes replaced by one prefork (`-c` cores) or one threads (`-c 32`) worker.
- (b) enqueue: `bench/_producer.py` in a fresh process: `.delay()` in a loop after one warm-up
  call (stock's task stores results, so its `.delay()` subscribes to each result, as stock
  does); `enqueue_many` over four times as many signatures.
- (c) round trip: 1,000 sequential `.delay().get()` after 20 warm-up calls, workers idle.
- Worker RSS: each Procfile worker kind and stock, started alone, idle, after answering a ping.
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
    task: str = "noop"  # which bench._projtasks task a proj drain enqueues
    env: dict[str, str] = field(default_factory=dict)

    def commands(self) -> list[list[str]]:
        """Full command lines."""
        module = "bench._stock" if self.app == "stock" else "proj"
        return [common.celery_worker(module, *args) for args in self.workers]


def stock_config() -> Config:
    """Stock Celery: `celery -A app worker`, every default."""
    return Config(
        "stock Celery defaults",
        "stock",
        [["-n", "stock@%h", "-l", "WARNING"]],
        queue="celery",
        acks_late=False,
    )


def proj_worker(name: str, pool: str, concurrency: int, *extra: str, include: str = "") -> list[str]:
    """One proj worker consuming the short-task queue, with the benchmark tasks loaded."""
    modules = ",".join(filter(None, (BENCH_TASKS, include)))
    return [
        "-Q",
        "default",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        *PROJ_FLAGS,
        "-I",
        modules,
        *extra,
    ]


PROCFILE = common.ROOT / "Procfile"


def procfile_workers() -> dict[str, list[str]]:
    """The `celery worker` arguments of each Procfile entry: the production configuration."""
    workers = {}
    for line in PROCFILE.read_text().splitlines():
        name, _, command = line.partition(":")
        words = shlex.split(command.replace('"$FILES_CONCURRENCY"', str(os.cpu_count() or 1)))
        if line.startswith("#") or words[:4] != ["exec", "celery", "-A", "proj"] or words[4] != "worker":
            continue
        workers[name.strip()] = words[5:]
    return workers


def production_config() -> Config:
    """Every Procfile worker that consumes `default` (the short-task queue), benchmark tasks loaded."""
    workers = [
        [*args, "-I", BENCH_TASKS]
        for args in procfile_workers().values()
        if "default" in args[args.index("-Q") + 1].split(",")
    ]
    return Config("proj Procfile short-task workers", "proj", workers)


# --- (a) drain -------------------------------------------------------------------------------


def _enqueue(config: Config, redis_url: str, n: int) -> list[str]:
    """Pre-enqueue n short tasks with the bulk helper; the ids of the last few."""
    from celery import Celery

    from proj.integration.enqueue_many import enqueue_many

    if config.app == "proj":
        from bench import _projtasks

        task = getattr(_projtasks, config.task)
        signatures = [task.s() for _ in range(n)]
    else:
        # A producer-only twin of the stock app: same messages, but no result subscriptions here.
        producer = Celery("stock-producer", broker=redis_url)
        signatures = [producer.signature("bench._stock.noop") for _ in range(n)]
    return [result.id for result in enqueue_many(signatures)[-64:]]


def _drained(client: redis.Redis, config: Config, tail: list[str]) -> bool:
    """Every task has run: nothing queued, nothing unacked, and (results on) the last results stored."""
    if client.llen(config.queue) or client.hlen("unacked") or InflightLists(client).count():
        return False
    if config.acks_late:
        return True
    return bool(client.exists(*(f"celery-task-meta-{task_id}" for task_id in tail)) == len(tail))


def _nodes(config: Config) -> list[str]:
    """The node names of the workers of `config` (each command line carries `-n name@%h`)."""
    import socket

    return [args[args.index("-n") + 1].replace("%h", socket.gethostname()) for args in config.workers]


def start_workers(config: Config, redis_url: str, tag: str) -> list[subprocess.Popen[bytes]]:
    """Start the workers of `config` and wait until every one answers a ping."""
    app = _control_app(redis_url)
    env = common.child_env(redis_url, **config.env)
    procs = [
        common.spawn(cmd, env, LOGS / f"{tag}-{config.label}-{i}.log")
        for i, cmd in enumerate(config.commands())
    ]
    try:
        common.ping_until_ready(app, _nodes(config))
    except BaseException:
        common.stop(procs)
        raise
    return procs


def _control_app(redis_url: str) -> Any:
    """A bare app for remote control (ping, add/cancel consumer) of any worker on `redis_url`."""
    from celery import Celery

    return Celery("bench-control", broker=redis_url)


def drain(config: Config, redis_url: str, n: int) -> dict[str, float]:
    """(a) n tasks enqueued while the ready workers do not consume; then all start at once.

    Workers are started and warmed up first and told to stop consuming (remote control), so start-up
    cost is neither timed nor counted in CPU; the clock starts when they are told to consume again.
    """
    common.flush(redis_url)
    procs = start_workers(config, redis_url, "drain")
    app, nodes = _control_app(redis_url), _nodes(config)
    client = redis.Redis.from_url(redis_url)
    try:
        app.control.cancel_consumer(config.queue, destination=nodes, reply=True, timeout=5)
        tail = _enqueue(config, redis_url, n)
        started, cpu0 = time.perf_counter(), common.tree_cpu(p.pid for p in procs)
        app.control.add_consumer(config.queue, destination=nodes, reply=False)
        common.wait_for(
            lambda: _drained(client, config, tail) and _drained(client, config, tail),
            timeout=600,
            interval=0.005,
            what=f"{config.label} to drain {n} tasks",
        )
        elapsed, cpu = time.perf_counter() - started, common.tree_cpu(p.pid for p in procs) - cpu0
        rss = common.tree_rss(p.pid for p in procs)
    finally:
        common.stop(procs)
        client.close()
    return {"per_second": n / elapsed, "cpu_us": cpu / n * 1e6, "rss": rss["total"]}


# --- (b), (c) producers ------------------------------------------------------------------------


def producer(
    mode: str, app: str, n: int, redis_url: str, env: dict[str, str] | None = None
) -> dict[str, float]:
    """Run bench._producer in a fresh process and return its figures."""
    out = subprocess.run(
        [sys.executable, "-m", "bench._producer", mode, app, str(n)],
        cwd=common.ROOT,
        env=common.child_env(redis_url, **(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
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
    return [
        common.row("redis-py LPUSH+BRPOP floor", "pairs/s", n / elapsed, "1/s"),
        common.row("redis-py LPUSH+BRPOP floor", "round trip", elapsed / n * 1e6 / 2, "µs"),
    ]


def drain_rows(redis_url: str, n: int) -> tuple[list[common.Row], dict[str, float]]:
    """(a) stock vs proj's production short-task workers draining n pre-enqueued tasks; proj's figures."""
    stock, proj = drain(stock_config(), redis_url, n), drain(production_config(), redis_url, n)
    scenario = f"(a) drain {n:,} short tasks"
    rows = []
    for label, figures in (("stock", stock), ("proj", proj)):
        rows += [
            common.row(scenario, f"{label} tasks/s", figures["per_second"], "1/s"),
            common.row(scenario, f"{label} CPU per task", figures["cpu_us"], "µs"),
            common.row(scenario, f"{label} RSS after the drain", figures["rss"], "MiB"),
        ]
    rows += [
        common.ratio(scenario, "proj / stock tasks/s", proj["per_second"], stock["per_second"]),
        common.ratio(scenario, "stock / proj CPU per task", stock["cpu_us"], proj["cpu_us"]),
    ]
    return rows, proj


def _variant(label: str, workers: list[list[str]], task: str = "noop") -> Config:
    """A variation of the production short-task workers, for the ablation rows."""
    return Config(label, "proj", workers, task=task)


def _swap(args: list[str], option: str, value: str) -> list[str]:
    """`args` with the value of `option` replaced."""
    changed = list(args)
    changed[changed.index(option) + 1] = value
    return changed


def ablations() -> list[Config]:
    """Production minus one change at a time (the effect of each change, measured in one run)."""
    base = production_config().workers
    first = base[0]
    return [
        _variant(
            "kombu's own Redis transport",
            [_swap(a, "-I", f"{BENCH_TASKS},bench._kombu_transport") for a in base],
        ),
        _variant(
            "BRPOP + an unacked record instead of BLMOVE into an inflight list",
            [_swap(a, "-I", f"{BENCH_TASKS},bench._brpop_consume") for a in base],
        ),
        _variant(
            "task events flushed every loop turn",
            [_swap(a, "-I", f"{BENCH_TASKS},bench._per_turn_events") for a in base],
        ),
        _variant("results stored (+ STARTED)", base, task="noop_result"),
        _variant(
            "-l INFO (a log line per received and per finished task)", [_swap(a, "-l", "INFO") for a in base]
        ),
        _variant(
            f"one prefork worker -c {len(base)}",
            [[*_swap(_swap(first, "-P", "prefork"), "-n", "prefork@%h"), "-c", str(len(base))]],
        ),
        _variant(
            "one threads worker -c 32",
            [[*_swap(_swap(first, "-P", "threads"), "-n", "threads@%h"), "-c", "32"]],
        ),
    ]


def ablation_rows(redis_url: str, n: int, production: dict[str, float]) -> list[common.Row]:
    """(a') the drain again with one of proj's changes undone at a time; ratios to production."""
    rows = []
    for config in ablations():
        figures = drain(config, redis_url, n)
        scenario = f"(a') drain {n:,}, production but {config.label}"
        rows += [
            common.row(scenario, "tasks/s", figures["per_second"], "1/s"),
            common.row(scenario, "CPU per task", figures["cpu_us"], "µs"),
            common.ratio(
                scenario, "production / this, tasks/s", production["per_second"], figures["per_second"]
            ),
        ]
    return rows


def enqueue_rows(redis_url: str, n: int) -> list[common.Row]:
    """(b) one producer: stock .delay(), proj .delay(), proj's bulk helper."""
    stock = producer("delay", "stock", n, redis_url)["per_second"]
    delay = producer("delay", "proj", n, redis_url)["per_second"]
    bulk = producer("bulk", "proj", n * 4, redis_url)["per_second"]
    kombu = producer("delay", "proj-kombu", n, redis_url)["per_second"]
    declare = producer("delay", "proj-kombu-declare", n, redis_url)["per_second"]
    whole = producer("bulk", "proj-bulk-whole", n * 4, redis_url)["per_second"]
    scenario = "(b) enqueue from one producer"
    return [
        common.row(scenario, "stock .delay()", stock, "1/s"),
        common.row(scenario, "proj .delay()", delay, "1/s"),
        common.row(scenario, "proj enqueue_many()", bulk, "1/s"),
        common.row(scenario, "proj .delay(), kombu's own Redis transport", kombu, "1/s"),
        common.row(scenario, "proj enqueue_many(), every message built by apply_async", whole, "1/s"),
        common.ratio(scenario, "proj enqueue_many() / proj .delay()", bulk, delay),
        common.ratio(scenario, "proj enqueue_many() / stock .delay()", bulk, stock),
        common.ratio(scenario, "proj .delay() / stock .delay()", delay, stock),
        common.ratio(scenario, "proj .delay() / same with kombu's transport", delay, kombu),
        common.ratio(scenario, "proj .delay() / same with kombu's declaration check", delay, declare),
        common.ratio(
            scenario, "proj enqueue_many() / same building every message by apply_async", bulk, whole
        ),
    ]


def roundtrip(config: Config, redis_url: str, n: int) -> dict[str, float]:
    """(c) `.delay().get()` n times against idle workers of `config` (its env for both ends)."""
    common.flush(redis_url)
    procs = start_workers(config, redis_url, "roundtrip")
    try:
        return producer("roundtrip", config.app, n, redis_url, env=config.env)
    finally:
        common.stop(procs)


def roundtrip_ablations(redis_url: str) -> list[Config]:
    """proj's round trip with one of its changes undone, workers and caller alike."""
    workers = production_config().workers
    celery_backend = {"CELERY_RESULT_BACKEND": f"celery.backends.redis:RedisBackend+{redis_url}"}
    brpop = [_swap(a, "-I", f"{BENCH_TASKS},bench._brpop_consume") for a in workers]
    return [
        Config("BRPOP + an unacked record instead of BLMOVE", "proj", brpop),
        Config("SUBSCRIBE through redis-py's pub/sub path", "proj-redispy-subscribe", workers),
        Config("Celery's own Redis result backend", "proj", workers, env=celery_backend),
        Config("kombu's declaration check in .delay()", "proj-kombu-declare", workers),
        Config("STARTED tracked", "proj-started", workers),
    ]


def roundtrip_rows(redis_url: str, n: int) -> list[common.Row]:
    """(c) round trip p50/p99, stock vs proj, and proj minus each of its round-trip changes."""
    stock, proj = roundtrip(stock_config(), redis_url, n), roundtrip(production_config(), redis_url, n)
    scenario = f"(c) round trip .delay().get(), {n:,} sequential"
    rows = [
        common.row(scenario, "stock p50", stock["p50"], "µs"),
        common.row(scenario, "stock p99", stock["p99"], "µs"),
        common.row(scenario, "proj p50", proj["p50"], "µs"),
        common.row(scenario, "proj p99", proj["p99"], "µs"),
        common.ratio(scenario, "proj p50 / stock p50", proj["p50"], stock["p50"]),
    ]
    for config in roundtrip_ablations(redis_url):
        undone = roundtrip(config, redis_url, n)
        rows += [
            common.row(scenario, f"proj p50, but {config.label}", undone["p50"], "µs"),
            common.ratio(scenario, f"this / proj p50, {config.label}", undone["p50"], proj["p50"]),
        ]
    return rows


def rss_rows(redis_url: str) -> list[common.Row]:
    """RSS of each worker kind, idle after start-up: the Procfile's workers and stock Celery."""
    kinds = {name: args for name, args in procfile_workers().items() if not name.endswith("-2")}
    rows = []
    for name, args in [*kinds.items(), ("stock Celery defaults", stock_config().workers[0])]:
        app = "stock" if name.startswith("stock") else "proj"
        config = Config(name, app, [args])
        procs = start_workers(config, redis_url, "rss")
        try:
            rss = common.tree_rss(p.pid for p in procs)
        finally:
            common.stop(procs)
        pool = args[args.index("-P") + 1] if "-P" in args else "prefork"
        label, scenario = f"{name} ({pool})", "worker RSS, idle after start-up"
        rows += [
            common.row(scenario, f"{label} main process", rss["main"], "MiB"),
            common.row(scenario, f"{label} pool children", rss["children"], "MiB"),
        ]
    return rows


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """Every throughput and latency scenario, once."""
    n = 2_000 if quick else 10_000
    drained, production = drain_rows(redis_url, n)
    return [
        *broker_floor(redis_url, n),
        *enqueue_rows(redis_url, 1_000 if quick else 5_000),
        *drained,
        *ablation_rows(redis_url, n, production),
        *roundtrip_rows(redis_url, 200 if quick else 1_000),
        *rss_rows(redis_url),
    ]


if __name__ == "__main__":
    common.standalone("throughput", run)
