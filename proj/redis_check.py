"""Why a process cannot use its Redis, in two lines: what happened (URL masked) and the likely cause.

Asked once before a `proj` command runs, before `proj up` starts anything, and before a worker or
beat prints its banner: an unreachable Redis (often variables left from a stopped local stack) is
then a clear message instead of a traceback or minutes of connection retries.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import urlsplit

from proj.credentials import check_redis, mask_url
from proj.settings import Settings

# Short enough that a command says it well within 5 s of being started, long enough for a LAN.
QUICK_TIMEOUT = 2.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STACK_VARIABLES = "REDIS_URL CELERY_BROKER_URL CELERY_RESULT_BACKEND"


def redis_problem(url: str, settings: Settings, starting_stack: bool = False) -> tuple[str, str] | None:
    """None when Redis at `url` is the one to use; else (verdict, one or two lines saying why).

    The verdict is check_redis's ("refused", "unreachable"), or "elsewhere": the URL is the default
    (no REDIS_URL) and answers, but a local stack runs here with another Redis, the one meant.
    """
    verdict, why = check_redis(url, QUICK_TIMEOUT)
    if verdict == "ok":
        return None if settings.redis_url_given else _not_the_stacks(url, settings)
    if verdict == "refused":
        return verdict, why  # the line names the fix: the password in the URL
    return verdict, f"{why}\n  {likely_cause(url, settings, starting_stack)}"


def likely_cause(url: str, settings: Settings, starting_stack: bool = False) -> str:
    """The most probable reason this Redis is not there, and what to do about it."""
    env_file = settings.local_dir / "stack.env"
    if not settings.redis_url_given:
        return (
            "REDIS_URL is not set, so this is the default: start the local stack (`make run`), "
            f"then `source {env_file}`"
        )
    if url.startswith("sentinel://"):  # a local stack never started these: the sentinels or the name
        return (
            "Check that the sentinels of REDIS_URL run and monitor the master that REDIS_SENTINEL_MASTER"
            f" names ({settings.redis_sentinel_master!r})"
        )
    if urlsplit(url.split(";")[0]).hostname not in LOCAL_HOSTS:
        return "Check REDIS_URL / CELERY_BROKER_URL and that this Redis runs and is reachable from here"
    if starting_stack:
        return (
            f"REDIS_URL is set in this shell (left from an earlier `source {env_file}`?): "
            f"`unset {STACK_VARIABLES}` to run the stack's own Redis"
        )
    running = stack_redis_url(env_file)
    if running is None:
        return (
            f"Left from an earlier `source {env_file}`? No local stack runs now: start it (`make run`), "
            f"or open a new shell / `unset {STACK_VARIABLES}`"
        )
    if running != url:
        return f"The running local stack's Redis is {mask_url(running)}: `source {env_file}` again"
    return f"The local stack of {env_file} is starting or has stopped: see the output of `proj up`"


def _not_the_stacks(url: str, settings: Settings) -> tuple[str, str] | None:
    """("elsewhere", why) when a default URL reaches some Redis while the local stack runs another."""
    env_file = settings.local_dir / "stack.env"
    running = stack_redis_url(env_file)
    if running is None or running == url:
        return None
    return "elsewhere", (
        f"REDIS_URL is not set, so this would use {mask_url(url)}, not the running local stack's "
        f"Redis at {mask_url(running)}\n  `source {env_file}` first (or set REDIS_URL to the Redis you mean)"
    )


def stack_redis_url(env_file: Path) -> str | None:
    """REDIS_URL as the stack.env of a running `proj up` sets it, or None when there is none."""
    try:
        text = env_file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and words[1].startswith("REDIS_URL="):
            return words[1].partition("=")[2]
    return None
