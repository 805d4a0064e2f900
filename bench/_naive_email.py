"""The naive email setup: a stock Celery app and a task that opens one SMTP connection per message.

What a first implementation usually looks like: `Celery(broker=..., backend=...)`, every default
(prefork, concurrency = cores, acks early, results stored), smtplib inside the task.
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage

from celery import Celery

_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("naive_email", broker=_url, backend=_url)


@app.task
def send_email(to: str, subject: str, text: str) -> str:
    """Connect, send one message, quit."""
    msg = EmailMessage()
    msg["From"] = "bench@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(text)
    with smtplib.SMTP(os.environ["SMTP_HOST"], int(os.environ["SMTP_PORT"]), timeout=30) as smtp:
        smtp.send_message(msg)
    return to
