"""Runtime settings for the services, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from proj.errors import ConfigurationError

SMTP_SECURITY_MODES = ("none", "starttls", "tls")


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    """Read an integer variable or explain which one is wrong."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    """Read a number variable or explain which one is wrong."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None


def _stall_window(environ: Mapping[str, str]) -> float:
    """PROJ_STALL_WINDOW: a window in seconds, 0 for off; a negative one is a typo."""
    window = _float(environ, "PROJ_STALL_WINDOW", Settings.stall_window)
    if window < 0:
        raise ConfigurationError(f"PROJ_STALL_WINDOW must be 0 (off) or a number of seconds, got {window:g}")
    return window


REDIS_BROKER_SCHEMES = ("redis://", "rediss://", "sentinel://")


def _redis_url(environ: Mapping[str, str]) -> str:
    """proj's own Redis: the broker's when it is Redis, else REDIS_URL (a RabbitMQ broker has no stores)."""
    broker = environ.get("CELERY_BROKER_URL", "")
    if broker.startswith(REDIS_BROKER_SCHEMES):
        return broker
    return environ.get("REDIS_URL", "")


@dataclass(frozen=True)
class Settings:
    """Everything the services need to know about their environment."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    # Master name for sentinel:// URLs (sentinel://host:26379;sentinel://host2:26379/0).
    redis_sentinel_master: str = "mymaster"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_security: str = "none"
    smtp_timeout: float = 30.0
    smtp_ca_file: str = ""
    mail_from: str = "proj@localhost"
    email_rate_limits: str = ""
    # Backoff cap for SMTP retries; delays past BROKER_MAX_COUNTDOWN wait in the delayed set.
    email_retry_backoff_max: int = 600
    # Retries of one message (and extra rounds of a bulk send): with the cap above, an SMTP outage
    # shorter than 811 s exhausts no message's retries (proj.mail.retry.outage_bound).
    email_max_retries: int = 10
    # Raw attachment bytes per message: ~10 MB once base64 encoded, what most providers accept.
    email_max_attachment_bytes: int = 7_500_000
    # Characters per body part (text, HTML; rendered templates too): far above a real message (Gmail
    # clips HTML past 102 kB), well below what slows a worker building and sending it.
    email_max_body_chars: int = 1_000_000
    # Messages per bulk chunk (one SMTP connection each) and chunks sent at once by one bulk task.
    email_bulk_chunk_size: int = 50
    email_bulk_connections: int = 8
    # Recipients per send_bulk call: the whole list travels in one task message and each retry's;
    # a longer list is split by the caller into several calls.
    email_bulk_max_recipients: int = 10_000
    # How long the idempotency ledger remembers a sent message (seconds).
    email_ledger_ttl: int = 7 * 86400
    # Dead letters hold whole message bodies: dropped after this many seconds, oldest first past the count.
    dlq_max_age: int = 7 * 86400
    dlq_max_count: int = 10_000
    # Jinja2 templates; empty means the templates shipped in proj/templates.
    mail_templates_dir: str = ""
    files_root: Path = Path(".local/files")
    # Temporary files older than this are orphans of killed tasks: the beat cleaner removes them.
    files_temp_max_age: int = 3600
    # Below Pillow's 89 MP default: a 64 MP RGB decode stays under ~200 MB per worker child.
    files_max_image_pixels: int = 64_000_000
    # Archive budget, counted while extracting (headers can lie): bytes, members, ratio, nesting.
    files_archive_max_bytes: int = 1 << 30
    files_archive_max_members: int = 10_000
    files_archive_max_ratio: int = 100
    files_archive_max_depth: int = 3
    # Longest CSV line/field read into memory; a field past it is a hostile file, not data.
    files_csv_max_field: int = 1 << 20
    local_dir: Path = Path(".local")
    flower_user: str = ""
    flower_password: str = field(default="", repr=False)
    flower_port: int = 5555
    # 0 lets the local stack pick a free port from 6380 up (6379 is often a system Redis).
    redis_port: int = 0
    # REDIS_URL or CELERY_BROKER_URL was given: the local stack uses that Redis and starts none.
    redis_url_given: bool = False
    # CELERY_BROKER_URL as given ("" when unset): the local stack keeps a RabbitMQ broker.
    broker_url: str = field(default="", repr=False)  # may hold a password
    # Seconds a queue may hold messages that a worker with free slots takes none of before the
    # worker counts as stalled and exits to be restarted (docs/operations.md); 0 turns it off.
    stall_window: float = 120.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        security = env.get("SMTP_SECURITY", "none").strip().lower() or "none"
        if security not in SMTP_SECURITY_MODES:
            raise ConfigurationError(
                f"SMTP_SECURITY must be one of {', '.join(SMTP_SECURITY_MODES)}, got {security!r}"
            )
        local_dir = Path(env.get("PROJ_LOCAL_DIR", ".local"))
        return cls(
            redis_url=_redis_url(env) or cls.redis_url,
            smtp_host=env.get("SMTP_HOST", cls.smtp_host),
            smtp_port=_int(env, "SMTP_PORT", cls.smtp_port),
            smtp_username=env.get("SMTP_USERNAME", ""),
            smtp_password=env.get("SMTP_PASSWORD", ""),
            smtp_security=security,
            smtp_timeout=_float(env, "SMTP_TIMEOUT", cls.smtp_timeout),
            smtp_ca_file=env.get("SMTP_CA_FILE", ""),
            mail_from=env.get("MAIL_FROM", cls.mail_from),
            email_rate_limits=env.get("EMAIL_RATE_LIMITS", ""),
            email_retry_backoff_max=_int(env, "EMAIL_RETRY_BACKOFF_MAX", cls.email_retry_backoff_max),
            email_max_retries=_int(env, "EMAIL_MAX_RETRIES", cls.email_max_retries),
            email_max_attachment_bytes=_int(
                env, "EMAIL_MAX_ATTACHMENT_BYTES", cls.email_max_attachment_bytes
            ),
            email_max_body_chars=_int(env, "EMAIL_MAX_BODY_CHARS", cls.email_max_body_chars),
            email_bulk_chunk_size=_int(env, "EMAIL_BULK_CHUNK_SIZE", cls.email_bulk_chunk_size),
            email_bulk_connections=_int(env, "EMAIL_BULK_CONNECTIONS", cls.email_bulk_connections),
            email_bulk_max_recipients=_int(env, "EMAIL_BULK_MAX_RECIPIENTS", cls.email_bulk_max_recipients),
            email_ledger_ttl=_int(env, "EMAIL_LEDGER_TTL", cls.email_ledger_ttl),
            dlq_max_age=_int(env, "DLQ_MAX_AGE", cls.dlq_max_age),
            dlq_max_count=_int(env, "DLQ_MAX_COUNT", cls.dlq_max_count),
            mail_templates_dir=env.get("MAIL_TEMPLATES_DIR", ""),
            files_root=Path(env.get("FILES_ROOT", str(local_dir / "files"))),
            files_temp_max_age=_int(env, "FILES_TEMP_MAX_AGE", cls.files_temp_max_age),
            files_max_image_pixels=_int(env, "FILES_MAX_IMAGE_PIXELS", cls.files_max_image_pixels),
            files_archive_max_bytes=_int(env, "FILES_ARCHIVE_MAX_BYTES", cls.files_archive_max_bytes),
            files_archive_max_members=_int(env, "FILES_ARCHIVE_MAX_MEMBERS", cls.files_archive_max_members),
            files_archive_max_ratio=_int(env, "FILES_ARCHIVE_MAX_RATIO", cls.files_archive_max_ratio),
            files_archive_max_depth=_int(env, "FILES_ARCHIVE_MAX_DEPTH", cls.files_archive_max_depth),
            files_csv_max_field=_int(env, "FILES_CSV_MAX_FIELD", cls.files_csv_max_field),
            local_dir=local_dir,
            flower_user=env.get("FLOWER_USER", ""),
            flower_password=env.get("FLOWER_PASSWORD", ""),
            flower_port=_int(env, "FLOWER_PORT", cls.flower_port),
            redis_port=_int(env, "REDIS_PORT", cls.redis_port),
            redis_url_given=bool(_redis_url(env)),
            broker_url=env.get("CELERY_BROKER_URL", "").strip(),
            redis_sentinel_master=env.get("REDIS_SENTINEL_MASTER", cls.redis_sentinel_master),
            stall_window=_stall_window(env),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return Settings.from_env()


def environ_with(overrides: Mapping[str, str]) -> dict[str, str]:
    """The process environment plus `overrides`, for the processes the local stack starts."""
    return {**os.environ, **overrides}
