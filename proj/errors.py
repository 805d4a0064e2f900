"""The two-branch error hierarchy that decides whether a task is retried.

ProjError
├── TransientError            retried with backoff (SMTP 4xx, connection trouble, storage down)
│   ├── StorageUnavailableError   the storage root cannot be read or written right now
│   ├── EmailDeliveryError    SMTP 4xx, refused/reset connections, timeouts, TLS handshakes
│   └── RateLimitedError      a recipient domain is over its limit; re-scheduled, not retried
└── PermanentError            never retried; recorded as a dead letter
    ├── ConfigurationError    a setting is missing or malformed
    ├── InvalidEmailError     bad address, header, template, context or attachment
    ├── EmailRejectedError    the SMTP server answered 5xx
    ├── UnsafePathError       a key or archive member would leave the storage root
    ├── FileNotFoundForProcessing   the file is missing or empty
    ├── InvalidFileError      corrupt, truncated, unsupported or over a limit (bombs)
    └── DeliveryLimitExceeded RabbitMQ dead-lettered the task's message after its delivery limit
"""

from __future__ import annotations


class ProjError(Exception):
    """Base of every error proj raises on purpose."""


class TransientError(ProjError):
    """Raised when the same call may succeed later; tasks retry these with backoff."""


class PermanentError(ProjError):
    """Raised when retrying cannot help; the task fails at once."""


class ConfigurationError(PermanentError):
    """Raised when a setting from the environment is missing or malformed."""


class StorageUnavailableError(TransientError):
    """Raised when the storage root fails with an I/O error that may clear up (disk full, EIO)."""


class UnsafePathError(PermanentError):
    """Raised when a key or an archive member name would resolve outside the storage root."""


class FileNotFoundForProcessing(PermanentError):
    """Raised when the file behind a key does not exist, is not a regular file, or is empty."""


class InvalidFileError(PermanentError):
    """Raised when a file's content is corrupt, truncated, not the expected type, or over a limit."""


class EmailDeliveryError(TransientError):
    """Raised when the SMTP server answers 4xx or the connection fails, times out or breaks TLS."""


class RateLimitedError(TransientError):
    """Raised when a recipient domain is over its rate limit; `retry_after` says when to come back."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StillRunningError(RateLimitedError):
    """Raised when an earlier run of the same task may still be sending; come back after `retry_after`."""


class InvalidEmailError(PermanentError):
    """Raised when a message cannot be built: bad address, header, body, template or attachment."""


class EmailRejectedError(PermanentError):
    """Raised when the SMTP server rejects the message or every recipient with a 5xx reply."""


class DeliveryLimitExceeded(PermanentError):
    """Stored for a task whose message RabbitMQ dead-lettered: delivered past its limit, never acked."""
