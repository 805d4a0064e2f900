"""One caller process: `python -m bench._producer {delay|bulk|roundtrip} FRAMEWORK TASK N`, JSON out.

FRAMEWORK is `stock` (bench._stock), `proj` (bench._projtasks; PROJ_STOCK_CELERY and the bench-only
PROJ_BENCH_WITHOUT apply as in the workers) or `huey` (bench._huey); TASK names the task in that
module. Each measurement runs in a fresh process so that result subscriptions and connection pools
left behind by one scenario cannot slow down the next, and none of them is left subscribed while
workers drain.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.common import percentile


def _task(framework: str, name: str) -> Any:
    """The benchmark task `name` of `framework`."""
    if framework == "stock":
        from bench import _stock

        return getattr(_stock, name)
    if framework == "huey":
        from bench import _huey

        return getattr(_huey, name)
    import bench._without  # noqa: F401  (PROJ_BENCH_WITHOUT, before the app's first use)
    from bench import _projtasks

    return getattr(_projtasks, name)


def _call(framework: str, task: Any) -> Any:
    """Enqueue one task as its users do: `.delay()` for Celery, calling the task for huey."""
    return task() if framework == "huey" else task.delay()


def delay(framework: str, name: str, n: int) -> dict[str, Any]:
    """`.delay()` in a loop, after one warm-up call; n + 1 tasks enqueued, the ids of the last 64."""
    task = _task(framework, name)
    _call(framework, task)  # connect and declare outside the clock
    results = []
    started = time.perf_counter()
    for _ in range(n):
        results.append(_call(framework, task))
    per_second = n / (time.perf_counter() - started)
    tail = [result.id for result in results[-64:] if result is not None]
    return {"per_second": per_second, "enqueued": n + 1, "tail": tail}


def bulk(framework: str, name: str, n: int) -> dict[str, float]:
    """proj.integration.enqueue_many.enqueue_many over n signatures (signatures built inside the clock)."""
    from proj.integration.enqueue_many import enqueue_many

    task = _task(framework, name)
    enqueue_many([task.s()])
    started = time.perf_counter()
    enqueue_many(task.s() for _ in range(n))
    return {"per_second": n / (time.perf_counter() - started)}


def roundtrip(framework: str, name: str, n: int) -> dict[str, float]:
    """Enqueue and wait for the result, one at a time; latencies in microseconds."""
    task = _task(framework, name)

    def once() -> None:
        if framework == "huey":
            task()(blocking=True, timeout=30)
        else:
            task.delay().get(timeout=30)

    for _ in range(20):  # warm up connections, subscriptions and the workers
        once()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        once()
        samples.append((time.perf_counter() - started) * 1e6)
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99)}


def main() -> None:
    """Run one mode and print its figures as JSON."""
    mode, framework, name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    figures = {"delay": delay, "bulk": bulk, "roundtrip": roundtrip}[mode](framework, name, n)
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
