"""Flower as proj runs it: Celery's `flower` command with `/metrics` behind Flower's own auth.

Celery glue. Flower serves its Prometheus `/metrics` (task names, worker names, counts) to anyone,
whatever `--basic-auth` says, and has no option to change that. `python -m proj.integration.flower ARGS` runs
`celery -A proj flower ARGS` with that one handler wrapped in Tornado's `authenticated`, the check
every other Flower page uses. `/healthcheck` stays open: it answers "OK" and nothing else.

`/metrics` also carries proj's own series: queue depths, the oldest message's age, unacknowledged and
parked messages per queue, dead letters, set-aside messages, canary round trips (proj.integration.metrics).

Flower picks the client that reads queue lengths (Broker page, `/api/queues/length`) by the scheme of
`app.connection().as_uri()`. With proj's kombu transport selected (`broker_transport`) that scheme is
the transport's import path, which Flower does not know ("'redis' broker is not supported"). The
wrapper hands Flower the same URL with `redis://`: Flower's own Redis client then reads the queues,
which proj's transport keeps where kombu's does, while the app keeps its transport.

On RabbitMQ Flower reads queue lengths from the management plugin's HTTP API: `FLOWER_BROKER_API`
(Flower's own variable for `--broker_api`) names it, and without it Flower asks port 15672 of the
broker's host with the broker's credentials; the wrapper says so in one line at start.

It also refuses to start, with one line and exit code 2, without a password: no basic auth (and no
OAuth `--auth`), or a `user:` pair with an empty password, which would leave task arguments and
results readable by anyone who can reach the port. Exit code 1 when Redis refuses the credentials of
the configured URL; an unreachable one is named in two lines first (proj.redis_check).
"""

from __future__ import annotations

import os.path
import sys
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from celery.bin.celery import celery, main
from flower.app import Flower
from flower.command import apply_env_options, flower, is_flower_option
from flower.views import monitor
from kombu import Connection
from tornado import web
from tornado.options import options

import celeryconfig
from proj.integration.kombu_transport import SentinelTransport as ProjSentinelTransport
from proj.integration.kombu_transport import Transport as ProjTransport
from proj.integration.metrics import register as register_proj_metrics
from proj.integration.native_delay import AMQP_SCHEMES
from proj.integration.startup import redis_urls
from proj.redis_check import redis_problem
from proj.settings import get_settings


def require_auth_on_metrics() -> None:
    """Make `/metrics` ask for the same credentials as Flower's pages and API."""
    handler: type = monitor.Metrics
    handler.get = web.authenticated(handler.get)  # type: ignore[attr-defined]


def broker_url_for_flower(connection: Connection, include_password: bool) -> str:
    """The connection's URL, with `redis` as scheme when it runs over proj's Redis transport."""
    url: str = connection.as_uri(include_password=include_password)
    transport = connection.get_transport_cls()
    if issubclass(transport, ProjSentinelTransport):
        return "sentinel" + url[url.index("://") :]
    if issubclass(transport, ProjTransport):
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


def auth_problem(argv: Sequence[str]) -> str | None:
    """Why Flower with these arguments (and FLOWER_* variables, and its config file) would be open."""
    # Flower's own order: environment, then the command line, then the config file it names, then
    # the command line again; without `final` so Flower's own parse later sets up logging once.
    apply_env_options()
    args = ["flower", *(a for a in argv if is_flower_option(a))]
    options.parse_command_line(args, final=False)
    if os.path.exists(options.conf):
        options.parse_config_file(os.path.abspath(options.conf), final=False)
        options.parse_command_line(args, final=False)
    if options.auth:
        return None  # OAuth (Google, GitHub, GitLab, Okta) guards the pages instead
    pairs = [p for p in (options.basic_auth or []) if p]
    if not pairs:
        return "no password: set FLOWER_BASIC_AUTH=user:password (or pass --basic-auth=user:password)"
    for pair in pairs:
        user, _, password = pair.partition(":")
        if not user:
            return "a basic-auth pair without a user name (FLOWER_BASIC_AUTH or --basic-auth)"
        if not password:
            return f"an empty password for user {user!r} (FLOWER_BASIC_AUTH or --basic-auth)"
    return None


def broker_api_missing(broker_url: str) -> str | None:
    """On RabbitMQ without FLOWER_BROKER_API (or --broker_api): where Flower's queue lengths come from."""
    if not broker_url.startswith(AMQP_SCHEMES) or options.broker_api:
        return None
    return (
        "queue lengths on RabbitMQ come from its management plugin's HTTP API: set "
        "FLOWER_BROKER_API=http://USER:PASSWORD@HOST:15672/api/ (without it Flower tries port 15672 "
        "of the broker's host; /metrics reads the depths from RabbitMQ itself)"
    )


def run() -> None:
    """`celery -A proj flower`: `/metrics` protected and with proj's series, queue lengths readable."""
    problem = auth_problem(sys.argv[1:])
    if problem:
        print(f"flower: refusing to start: {problem}", file=sys.stderr)
        sys.exit(2)
    for url in redis_urls(celeryconfig):
        unusable = redis_problem(url, get_settings())
        if unusable:  # first thing printed; an unreachable Redis is retried by Flower as it is
            print(f"flower: {unusable[1]}", file=sys.stderr, flush=True)
            if unusable[0] == "refused":
                sys.exit(1)
    missing_api = broker_api_missing(str(celeryconfig.broker_url))
    if missing_api:
        print(f"flower: {missing_api}", file=sys.stderr, flush=True)
    require_auth_on_metrics()
    read_queues_with_flowers_redis_client()
    from proj.celery import app  # the app `-A proj` names, loaded once

    register_proj_metrics(app)
    celery.add_command(flower)
    sys.argv = ["celery", "-A", "proj", "flower", *sys.argv[1:]]
    sys.exit(main())


if __name__ == "__main__":
    run()
