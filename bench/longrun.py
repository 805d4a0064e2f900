"""Worker memory over a long run: 100,000 short tasks through proj's short-task workers (run once)."""

from __future__ import annotations

import time

import redis

from bench import common
from bench.throughput import BENCH_TASKS, production_config, start_workers
from proj.stores.inflight import InflightLists

RUNS = 1  # one long run; repeating it would add nothing but time
TASKS = 100_000
QUICK_TASKS = 10_000
SAMPLES = 10

NOTES = f"""\
- {TASKS:,} fire-and-forget short tasks (`{BENCH_TASKS}`) enqueued with `enqueue_many`
  in chunks while proj's short-task workers (the Procfile's, see `throughput`) drain them. The RSS
  of every worker process is summed after the first tenth (warm) and at the end; `growth` is the
  difference. `worker_max_memory_per_child` stays the guard for prefork children, not the fix.
"""


def _enqueue(n: int) -> None:
    """Put n short tasks on the queue in chunks, so the producer itself stays small."""
    from bench import _projtasks
    from proj.integration.enqueue_many import enqueue_many

    chunk = 10_000
    for start in range(0, n, chunk):
        enqueue_many(_projtasks.noop.s() for _ in range(min(chunk, n - start)))


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """Drain a long run and report the workers' RSS when warm and at the end."""
    n = QUICK_TASKS if quick else TASKS
    config = production_config()
    procs = start_workers(config, redis_url, "longrun")
    client = redis.Redis.from_url(redis_url)
    pids = [p.pid for p in procs]
    try:
        started = time.perf_counter()
        _enqueue(n)
        samples = []
        for step in range(1, SAMPLES + 1):
            left = n - step * n // SAMPLES
            common.wait_for(
                lambda left=left: client.llen("default") <= left,
                timeout=900,
                interval=0.05,
                what=f"{left} tasks left",
            )
            samples.append(common.tree_rss(pids)["total"])
        common.wait_for(
            lambda: not client.hlen("unacked") and not InflightLists(client).count(),
            timeout=60,
            what="the last acks",
        )
        elapsed = time.perf_counter() - started
    finally:
        common.stop(procs)
        client.close()
    scenario = f"{n:,} tasks through {len(pids)} short-task workers"
    return [
        common.row(scenario, "tasks/s including enqueue", n / elapsed, "1/s"),
        common.row(scenario, "RSS, all workers, warm (after 1/10)", samples[0], "MiB"),
        common.row(scenario, "RSS, all workers, at the end", samples[-1], "MiB"),
        common.row(scenario, "RSS, max during the run", max(samples), "MiB"),
        common.row(scenario, "growth warm -> end", samples[-1] - samples[0], "MiB"),
    ]


if __name__ == "__main__":
    common.standalone("longrun", run)
