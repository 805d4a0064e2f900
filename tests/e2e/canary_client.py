"""Application code in another shell: send canaries through proj's app and print what came back.

Run with stack.env sourced: `python -m tests.e2e.canary_client [--kwargs JSON] [--wait-started] QUEUE...`.
Prints one JSON line with the task ids, `started` once every task runs (with --wait-started), then
one JSON line with each task's final state and result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("queues", nargs="+")
    parser.add_argument("--kwargs", type=json.loads, default={})
    parser.add_argument("--wait-started", action="store_true")
    args = parser.parse_args()

    from proj.celery import app

    sent = {q: app.send_task("tasks.health.canary", kwargs=args.kwargs, queue=q) for q in args.queues}
    print(json.dumps({q: r.id for q, r in sent.items()}), flush=True)
    if args.wait_started:
        deadline = time.monotonic() + 30
        while not all(r.state == "STARTED" for r in sent.values()):
            if time.monotonic() > deadline:
                sys.exit("tasks did not start within 30 s")
            time.sleep(0.05)
        print("started", flush=True)
    final = {}
    for queue, result in sent.items():
        value = result.get(timeout=60, propagate=False)
        final[queue] = {"state": result.state, "result": value if result.successful() else repr(value)}
    print(json.dumps(final), flush=True)


if __name__ == "__main__":
    main()
