"""Flower as proj runs it: Celery's `flower` command with `/metrics` behind Flower's own auth.

Celery glue. Flower serves its Prometheus `/metrics` (task names, worker names, counts) to anyone,
whatever `--basic-auth` says, and has no option to change that. `python -m proj.integration.flower ARGS` runs
`celery -A proj flower ARGS` with that one handler wrapped in Tornado's `authenticated`, the check
every other Flower page uses. `/healthcheck` stays open: it answers "OK" and nothing else.
"""

from __future__ import annotations

import sys

from celery.bin.celery import celery, main
from flower.command import flower
from flower.views import monitor
from tornado import web


def require_auth_on_metrics() -> None:
    """Make `/metrics` ask for the same credentials as Flower's pages and API."""
    handler: type = monitor.Metrics
    handler.get = web.authenticated(handler.get)  # type: ignore[attr-defined]


def run() -> None:
    """`celery -A proj flower` with the arguments given, `/metrics` protected."""
    require_auth_on_metrics()
    celery.add_command(flower)
    sys.argv = ["celery", "-A", "proj", "flower", *sys.argv[1:]]
    sys.exit(main())


if __name__ == "__main__":
    run()
