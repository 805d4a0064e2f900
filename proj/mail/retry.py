"""Email retry delays: exponential backoff with equal jitter, and the SMTP outage they outlast.

Celery's full jitter draws each delay from [0, cap], so all retries of a message may come within
seconds of each other and a short outage can exhaust them. Equal jitter draws from [cap/2, cap]:
retries still spread out (no herd when the server comes back), but each delay has a floor, so a
message's last attempt comes at least `outage_bound` after its first, however the dice fall.
"""

from __future__ import annotations

import random

from proj.settings import Settings

# Seconds: the cap of the first retry's delay, doubled for each further retry.
BACKOFF_BASE = 2


def backoff_cap(retries: int, maximum: float) -> float:
    """The longest delay after `retries` earlier retries: BACKOFF_BASE * 2**retries, at most `maximum`."""
    return float(min(BACKOFF_BASE * 2 ** min(retries, 64), maximum))


def retry_delay(retries: int, settings: Settings) -> float:
    """Seconds before the next attempt of a message already retried `retries` times."""
    cap = backoff_cap(retries, settings.email_retry_backoff_max)
    return cap / 2 + random.uniform(0, cap / 2)


def outage_bound(settings: Settings) -> float:
    """Shortest time from a message's first attempt to its last: an outage shorter loses nothing."""
    maximum = settings.email_retry_backoff_max
    return sum(backoff_cap(n, maximum) / 2 for n in range(settings.email_max_retries))
