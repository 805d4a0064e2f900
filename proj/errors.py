"""The two-branch error hierarchy that decides whether a task is retried.

    ProjError
    ├── TransientError            retried with backoff (SMTP 4xx, connection trouble, storage down)
    └── PermanentError            never retried; recorded as a dead letter
        └── ConfigurationError    a setting is missing or malformed
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
