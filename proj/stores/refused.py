"""Writes Redis refuses for now: one predicate for every caller in proj, and a bounded wait for them.

Redis answers some writes with an error that means "not now" rather than "never": OOM (full under
noeviction), READONLY (a replica: the old master after a failover), NOREPLICAS (a master with
`min-replicas-to-write` and too few replicas in sync: a promoted replica alone), MASTERDOWN (a
replica that lost its master) and LOADING (a restart reading its data). Nothing was applied, so the
same write can be sent again once Redis takes writes; giving up instead would lose it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

from redis import exceptions as redis_errors
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

logger = logging.getLogger(__name__)

# How long a caller keeps sending a refused write again before it gives up (RefusedWriteError).
REFUSED_RETRY_SECONDS = 60.0
REFUSED_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # then the last one until the time is up

# redis-py has classes for some codes only; NOREPLICAS is a plain ResponseError. Its text starts
# with the code, or names it after ": " (a pipeline's "... of pipeline caused error: NOREPLICAS").
_CODE = re.compile(r"(?:^|: )(OOM|READONLY|NOREPLICAS|MASTERDOWN|LOADING)\b")

# redis-py's classes for some of the codes (its type stubs lack some of them, hence getattr).
_REFUSAL_CLASSES: tuple[type[BaseException], ...] = tuple(
    getattr(redis_errors, name)
    for name in ("OutOfMemoryError", "ReadOnlyError", "MasterDownError", "BusyLoadingError")
)

T = TypeVar("T")


class RefusedWriteError(RedisConnectionError):
    """Redis still refused a write after the wait: a connection error, so kombu and Celery reconnect."""


def refused_for_now(exc: BaseException) -> bool:
    """Whether `exc` is Redis refusing a write for now (OOM, READONLY, NOREPLICAS, MASTERDOWN, LOADING)."""
    if isinstance(exc, _REFUSAL_CLASSES):
        return True
    return isinstance(exc, ResponseError) and _CODE.search(str(exc)) is not None


def retry_while_refused(action: Callable[[], T], what: str, seconds: float = REFUSED_RETRY_SECONDS) -> T:
    """Run `action`; while Redis refuses its write for now, run it again (logged once) for `seconds`.

    Raises:
        RefusedWriteError: still refused after `seconds`.
        redis.RedisError: any other error, at once.
    """
    since: float | None = None
    attempt = 0
    while True:
        try:
            result = action()
        except ResponseError as exc:
            if not refused_for_now(exc):
                raise
            now = time.monotonic()
            if since is None:
                since = now
                logger.warning(
                    "Redis refuses %s for now (%s); trying again for up to %g s", what, exc, seconds
                )
            delay = REFUSED_RETRY_DELAYS[min(attempt, len(REFUSED_RETRY_DELAYS) - 1)]
            if now + delay - since > seconds:
                raise RefusedWriteError(f"Redis still refuses {what} after {seconds:g} s: {exc}") from exc
            time.sleep(delay)
            attempt += 1
            continue
        if since is not None:
            logger.warning("Redis took %s after %.1f s", what, time.monotonic() - since)
        return result
