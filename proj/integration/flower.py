"""Flower as proj runs it: Celery's `flower` command with `/metrics` behind Flower's own auth.

Celery glue. Flower serves its Prometheus `/metrics` (task names, worker names, counts) to anyone,
whatever `--basic-auth` says, and has no option to change that. `python -m proj.integration.flower ARGS` runs
`celery -A proj flower ARGS` with that one handler wrapped in Tornado's `authenticated`, the check
every other Flower page uses. `/healthcheck` stays open: it answers "OK" and nothing else.

Flower picks the client that reads queue lengths (Broker page, `/api/queues/length`) by the scheme of
`app.connection().as_uri()`. With proj's kombu transport selected (`broker_transport`) that scheme is
the transport's import path, which Flower does not know ("'redis' broker is not supported"). The
wrapper hands Flower the same URL with `redis://`: Flower's own Redis client then reads the queues,
which proj's transport keeps where kombu's does, while the app keeps its transport.
"""

from __future__ import annotations

import sys
from functools import cached_property
from typing import Any

from celery.bin.celery import celery, main
from flower.app import Flower
from flower.command import flower
from flower.views import monitor
from kombu import Connection
from tornado import web

from proj.integration.kombu_transport import Transport as ProjTransport


def require_auth_on_metrics() -> None:
    """Make `/metrics` ask for the same credentials as Flower's pages and API."""
    handler: type = monitor.Metrics
    handler.get = web.authenticated(handler.get)  # type: ignore[attr-defined]


def broker_url_for_flower(connection: Connection, include_password: bool) -> str:
    """The connection's URL, with `redis` as scheme when it runs over proj's Redis transport."""
    url: str = connection.as_uri(include_password=include_password)
    if issubclass(connection.get_transport_cls(), ProjTransport):
        return "redis" + url[url.index("://") :]
    return url


def _broker_uri_property(name: str, include_password: bool) -> cached_property[str]:
    def broker_uri(self: Any) -> str:
        with self.capp.connection() as connection:
            return broker_url_for_flower(connection, include_password)

    prop = cached_property(broker_uri)
    prop.__set_name__(Flower, name)
    return prop


def read_queues_with_flowers_redis_client() -> None:
    """Give Flower's broker client (and the Broker page's URL) `redis://` for proj's transport."""
    for name, include_password in (("broker_uri", False), ("broker_uri_with_password", True)):
        setattr(Flower, name, _broker_uri_property(name, include_password))


def run() -> None:
    """`celery -A proj flower` with the arguments given, `/metrics` protected, queue lengths readable."""
    require_auth_on_metrics()
    read_queues_with_flowers_redis_client()
    celery.add_command(flower)
    sys.argv = ["celery", "-A", "proj", "flower", *sys.argv[1:]]
    sys.exit(main())


if __name__ == "__main__":
    run()
