"""The peer: huey (https://huey.readthedocs.io) on the same Redis, with the same empty task.

`python -m huey.bin.huey_consumer bench._huey.huey -w 2 -k process -q`: two worker processes (one per
core, like proj's two `-P solo` workers), WARNING logging. `BENCH_HUEY_RESULTS=1` stores every
result (`store_none=True`: huey skips a `None` result otherwise) and wakes a waiting caller with
BLPOP (`notify_result=True`) instead of huey's default polling; `0` stores nothing.
`BENCH_HUEY_QUEUE_KEY` makes a producer enqueue into another list (the bench renames it onto the
queue to start a drain at once).
"""

from __future__ import annotations

import os

from huey import RedisHuey

RESULTS = os.environ.get("BENCH_HUEY_RESULTS", "1") == "1"
huey = RedisHuey(
    "bench",
    url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    results=RESULTS,
    store_none=True,
    notify_result=True,
    utc=True,
)
if os.environ.get("BENCH_HUEY_QUEUE_KEY"):
    huey.storage.queue_key = os.environ["BENCH_HUEY_QUEUE_KEY"]


@huey.task()
def noop() -> None:
    """The shortest task there is (the same body as bench._stock.noop)."""
