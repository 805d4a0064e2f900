"""The app class: Celery's, with countdowns under a second made one second on RabbitMQ.

Why: with quorum queues Celery routes every countdown through RabbitMQ's delay exchanges in whole
seconds (native delayed delivery), and a countdown between 0 and 1 s truncates to 0, which kombu
refuses with ValueError: a sub-second retry or rate-limit delay would fail its publish.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import Celery as CeleryBase
from dateutil.parser import isoparse

AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def whole_second_delay(countdown: Any, eta: Any, now: datetime) -> tuple[Any, Any]:
    """(countdown, eta), with a delay between 0 and 1 s replaced by a countdown of 1 s."""
    if countdown is not None:
        delay = float(countdown)
    elif eta is not None:
        delay = ((isoparse(eta) if isinstance(eta, str) else eta) - now).total_seconds()
    else:
        return countdown, eta
    return (1, None) if 0 < delay < 1 else (countdown, eta)


class Celery(CeleryBase):
    """Celery; on a RabbitMQ broker a sub-second delay waits one second instead of failing."""

    def send_task(  # type: ignore[override]  # the same call, fewer annotations
        self,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        countdown: Any = None,
        eta: Any = None,
        **options: Any,
    ) -> Any:
        if (countdown or eta) and str(self.conf.broker_url).startswith(AMQP_SCHEMES):
            countdown, eta = whole_second_delay(countdown, eta, self.now())
        return super().send_task(name, args, kwargs, countdown, eta, **options)
