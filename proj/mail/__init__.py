"""Email delivery services (no Celery here): validate before enqueueing, send exactly once."""

from proj.mail.message import EmailRequest, message_id_for, validate
from proj.mail.mime import build_message, to_bytes
from proj.mail.service import Mailer, get_mailer

__all__ = ["EmailRequest", "Mailer", "build_message", "get_mailer", "message_id_for", "to_bytes", "validate"]
