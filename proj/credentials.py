"""Secrets kept out of output: URLs with their password masked, text scrubbed, Redis credentials checked."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import redis

from proj.settings import get_settings
from proj.stores.connection import redis_client

MASK = "**"
# scheme://user:password@ (user may be empty: redis://:password@host); up to the last @ before the
# path, so an unencoded @ in a password is masked too. Bounded repeats: unbounded ones made the scan
# quadratic over a long run of letters (hours for a 2 MB argument quoted in an error, under the GIL).
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]{0,31}://[^:/@\s]{0,256}:)[^\s/]{1,1024}@")
# redis-py's own timeout is none: a check must never hang a process's start on a silent host.
CHECK_TIMEOUT = 5.0


def mask_url(url: str) -> str:
    """The URL with its password replaced by `**`, as Celery prints broker URLs."""
    return _URL_PASSWORD.sub(rf"\1{MASK}@", url)


def url_password(url: str) -> str:
    """The password in a URL, or "" when it has none (or cannot be parsed)."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def known_secrets() -> list[str]:
    """Every password of this process's settings: Redis (from its URL), SMTP and Flower."""
    settings = get_settings()
    found = (url_password(settings.redis_url), settings.smtp_password, settings.flower_password)
    # Longest first, so a password that contains another is replaced whole.
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` with URL passwords masked and every known secret (default: this process's) replaced."""
    text = mask_url(text)
    for secret in known_secrets() if secrets is None else secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def check_redis(url: str, timeout: float = CHECK_TIMEOUT) -> tuple[str, str]:
    """("ok", ""), ("refused", why) or ("unreachable", why) for Redis at `url`, the password masked.

    Only a refusal is final: an unreachable Redis may come up later, wrong credentials never work.
    "unreachable" also covers a server there that is not a Redis (it may be replaced by one).
    """
    client = redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError) as exc:
        return "refused", f"Redis at {mask_url(url)} refused the credentials: {_reason(exc)}"
    except redis.exceptions.NoPermissionError as exc:
        return "refused", f"Redis at {mask_url(url)} denies this user PING (see its ACL): {_reason(exc)}"
    except redis.RedisError as exc:
        return "unreachable", f"Redis at {mask_url(url)} {_unreachable(exc, url, timeout)}"
    finally:
        client.close()
    return "ok", ""


def _unreachable(exc: redis.RedisError, url: str, timeout: float) -> str:
    """What went wrong on the way to a Redis, in words rather than an errno."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ConnectionRefusedError):
        return "cannot be reached: nothing listens there (connection refused)"
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return "is still loading its data set; try again in a moment"
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return "is not a Redis: the server there answers in another protocol"
    if isinstance(exc, redis.TimeoutError):
        return f"gave no answer within {timeout:g} s (a host that is down or filtered, or not a Redis)"
    return f"cannot be reached: {scrub(str(exc), [url_password(url)])}"


def _reason(exc: BaseException) -> str:
    """A short reason with Redis's error code, which redis-py drops from the message."""
    code = getattr(exc, "status_code", None)
    if code == "NOAUTH":
        # redis-py's own text talks about HELLO; what the user needs to know is this.
        return "NOAUTH this Redis requires a password and the URL gives none"
    message = str(exc).rstrip(".")
    return f"{code} {message}" if code else message
