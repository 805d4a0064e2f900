"""proj's figures as Prometheus metrics, served by Flower's `/metrics` next to Flower's own.

Celery glue. A prometheus_client collector registered in Flower's process reads the figures of
`proj status` (proj.stores.readings) from Redis at each scrape, so a scrape sees what Redis holds
then, and the page carries Flower's authentication (proj.integration.flower). Every series is a
gauge: each reads the present content of a list or set that grows and shrinks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry

from proj.settings import REDIS_BROKER_SCHEMES, get_settings
from proj.stores.connection import redis_client
from proj.stores.queues import broker_queue_stats
from proj.stores.readings import QueueReading, Readings, read

logger = logging.getLogger(__name__)

# A scrape runs in Flower's event loop: a Redis that does not answer must not hold it for long.
SCRAPE_REDIS_TIMEOUT = 5.0

QUEUE_SERIES: tuple[tuple[str, str, Callable[[QueueReading], float | None]], ...] = (
    ("proj_queue_messages", "Messages waiting in the queue for a worker.", lambda q: q.depth),
    (
        "proj_queue_oldest_message_age_seconds",
        "Seconds the oldest waiting message has waited (0 when none waits).",
        lambda q: 0.0 if q.depth == 0 else q.oldest_age,
    ),
    (
        "proj_queue_unacked_messages",
        "Messages a worker has taken from the queue and not yet acknowledged (running or reserved).",
        lambda q: q.unacked,
    ),
    (
        "proj_queue_parked_messages",
        "Messages for the queue delayed past BROKER_MAX_COUNTDOWN, parked in proj's delayed set until due.",
        lambda q: q.parked,
    ),
)


def readings(app: Any, client: redis.Redis[bytes]) -> Readings:
    """The figures of every declared queue of `app`, queue depths from the broker when it is not Redis."""
    names = [queue.name for queue in app.conf.task_queues]
    if str(app.conf.broker_url).startswith(REDIS_BROKER_SCHEMES):
        return read(client, names)
    with app.connection_for_read() as connection:
        return read(client, names, broker_queue_stats(connection, names))


def families(found: Readings | None) -> list[Metric]:
    """The metric families of `found`; only proj_redis_up (0) with samples when Redis did not answer."""
    up = GaugeMetricFamily(
        "proj_redis_up", "1 when this scrape read proj's figures from Redis, 0 when Redis did not answer."
    )
    up.add_metric([], 0 if found is None else 1)
    queues = {name: GaugeMetricFamily(name, text, labels=["queue"]) for name, text, _ in QUEUE_SERIES}
    dead = GaugeMetricFamily(
        "proj_dead_letters",
        "Tasks that failed for good and wait in the dead letters.",
        labels=["task", "error"],
    )
    set_aside = GaugeMetricFamily(
        "proj_set_aside_messages",
        "Messages workers took but could not read, set aside for a person to look at.",
    )
    round_trip = GaugeMetricFamily(
        "proj_canary_round_trip_seconds",
        "Seconds from sending the last canary probe to the queue to its answer (when it was answered).",
        labels=["queue"],
    )
    success = GaugeMetricFamily(
        "proj_canary_success",
        "1 when the last canary probe of the queue was answered, else 0.",
        labels=["queue"],
    )
    probed = GaugeMetricFamily(
        "proj_canary_last_probe_timestamp_seconds",
        "When the last canary probe of the queue ended, in seconds since the epoch.",
        labels=["queue"],
    )
    if found is not None:
        for queue in found.queues:
            for name, _, value in QUEUE_SERIES:
                figure = value(queue)
                if figure is not None:
                    queues[name].add_metric([queue.name], figure)
        for letters in found.dead_letters:
            dead.add_metric([letters.task, letters.error], letters.count)
        set_aside.add_metric([], found.set_aside)
        for probe in found.canaries:
            if probe.seconds is not None:
                round_trip.add_metric([probe.queue], probe.seconds)
            success.add_metric([probe.queue], 1 if probe.ok else 0)
            probed.add_metric([probe.queue], probe.at)
    return [up, *queues.values(), dead, set_aside, round_trip, success, probed]


class ProjCollector:
    """Reads proj's figures from Redis at every scrape."""

    def __init__(self, app: Any, client: redis.Redis[bytes]) -> None:
        self.app = app
        self.client = client

    def describe(self) -> list[Metric]:
        """The families without reading Redis (prometheus_client checks names when registering)."""
        return families(None)

    def collect(self) -> Iterator[Metric]:
        try:
            found: Readings | None = readings(self.app, self.client)
        except Exception as exc:  # whatever failed, Flower's own series are still served
            logger.warning("Could not read proj's figures for /metrics: %s", exc)
            found = None
        yield from families(found)


def register(app: Any, registry: CollectorRegistry = REGISTRY) -> ProjCollector:
    """Add proj's figures to `registry` (Flower serves the default one at /metrics)."""
    client = redis_client(
        get_settings().redis_url,
        socket_timeout=SCRAPE_REDIS_TIMEOUT,
        socket_connect_timeout=SCRAPE_REDIS_TIMEOUT,
    )
    collector = ProjCollector(app, client)
    registry.register(collector)
    return collector
