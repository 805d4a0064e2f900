"""Workers and beat exit at start, with one clear line, when Redis refuses their credentials.

Celery glue. `broker_connection_max_retries = None` makes a worker retry a lost connection forever,
and redis-py's AuthenticationError is a ConnectionError, so wrong credentials would be retried
forever too. A wrong password never starts working: before the worker's consumer connects (a worker
step; Celery starts its Consumer step last) and when beat starts (`beat_init`), each Redis URL of the
configuration is asked once. A refusal ends the process with exit code 1; an unreachable Redis is
asked again until it answers, as Celery would keep trying to connect.

Before any of that, and before the worker's or beat's banner, each URL is asked once with a short
timeout (`import_modules`, which init_worker sends first): when Redis cannot be used, the first thing
the process prints is one or two lines naming the URL (password masked) and the likely cause
(proj.redis_check), not a screen of banner followed by retries.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

from celery import bootsteps
from celery.signals import beat_init, import_modules
from celery.worker.state import maybe_shutdown

from proj.credentials import check_redis
from proj.redis_check import redis_problem
from proj.settings import get_settings

logger = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://")
RETRY_MAX_INTERVAL = 10.0
_first_check_done = False


def redis_urls(conf: Any) -> list[str]:
    """The distinct Redis URLs of the broker and the result backend."""
    urls = [conf.broker_url, conf.result_backend]
    return list(dict.fromkeys(u for u in urls if isinstance(u, str) and u.startswith(REDIS_SCHEMES)))


def require_redis_credentials(urls: Iterable[str]) -> None:
    """Return once every URL's Redis accepts its credentials; SystemExit(1) as soon as one refuses."""
    for url in urls:
        interval = 1.0
        while True:
            verdict, why = check_redis(url)
            if verdict == "ok":
                break
            if verdict == "refused":
                logger.critical("%s; exiting (a wrong password is not retried)", why)
                raise SystemExit(1)
            logger.warning("%s; checking the credentials again in %.0f s", why, interval)
            _sleep(interval)
            interval = min(interval * 2, RETRY_MAX_INTERVAL)


def _sleep(seconds: float) -> None:
    """Sleep, but end the wait when a worker is told to stop (SIGTERM, Ctrl-C only set a flag)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        maybe_shutdown()  # raises WorkerShutdown / WorkerTerminate, which Celery's start handles
        time.sleep(0.1)


class CredentialCheck(bootsteps.StartStopStep):
    """Worker step: exit before the consumer connects when Redis refuses the credentials."""

    def start(self, worker: Any) -> None:
        # SystemExit from a step: Celery stops the steps already started and exits with its code.
        require_redis_credentials(redis_urls(worker.app.conf))


@beat_init.connect
def check_beat_credentials(sender: Any = None, **_: Any) -> None:
    """Beat: exit before the first schedule entry is sent when Redis refuses the credentials."""
    # SIGTERM meanwhile: beat's own handler raises SystemExit, which ends the wait.
    require_redis_credentials(redis_urls(sender.app.conf))


def say_first_why_redis_cannot_be_used(conf: Any, program: str) -> None:
    """Once per process: print why Redis cannot be used, if so; SystemExit(1) when it refuses."""
    global _first_check_done
    if _first_check_done:
        return
    _first_check_done = True
    for url in redis_urls(conf):
        problem = redis_problem(url, get_settings())
        if problem is None:
            continue
        verdict, why = problem
        # Logging is not set up yet: stderr, which is where Celery's own start-up errors go.
        print(f"{program}: {why}", file=sys.stderr, flush=True)
        if verdict == "refused":
            raise SystemExit(1)  # Celery's signal dispatch passes SystemExit on: the command exits 1
        return  # retried by the checks above, with a warning each time


@import_modules.connect
def check_redis_first(sender: Any = None, **_: Any) -> None:
    """Worker and beat: before the banner, say why Redis cannot be used."""
    # worker_initialized: only `celery worker` and `celery beat` import the task modules through
    # init_worker, first thing; Flower and `celery report` import them too and need no such line.
    if sender is not None and sender.loader.worker_initialized:
        program = next((word for word in sys.argv[1:] if word in ("worker", "beat")), "celery")
        say_first_why_redis_cannot_be_used(sender.conf, program)
