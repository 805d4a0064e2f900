"""`proj send-email`: check a message, enqueue it on the email queue and print its result."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from proj.errors import InvalidEmailError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `proj send-email`."""
    parser.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    parser.add_argument("--cc", action="append", default=None, help="copy recipient (repeatable)")
    parser.add_argument("--bcc", action="append", default=None, help="blind copy (repeatable)")
    parser.add_argument("--subject", help="subject line")
    parser.add_argument("--text", help="plain-text body")
    parser.add_argument("--html", help="HTML body (sent as the alternative part)")
    parser.add_argument("--template", help="template name under the templates folder")
    parser.add_argument("--context", default="{}", help="template variables as a JSON object")
    parser.add_argument("--attach", action="append", default=None, help="storage key to attach")
    parser.add_argument("--idempotency-key", help="sending twice with the same key sends once")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the result")
    parser.add_argument("--no-wait", action="store_true", help="print the task id and exit")


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The task's keyword arguments from the command line."""
    try:
        context = json.loads(args.context)
    except json.JSONDecodeError as exc:
        raise InvalidEmailError(f"--context is not JSON: {exc}") from None
    kwargs: dict[str, Any] = {
        "to": args.to,
        "cc": args.cc,
        "bcc": args.bcc,
        "attachments": args.attach,
        "idempotency_key": args.idempotency_key,
    }
    if args.template:
        kwargs.update(template=args.template, context=context)
    else:
        kwargs.update(subject=args.subject, text=args.text, html=args.html)
    return {k: v for k, v in kwargs.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    """Validate, enqueue `tasks.email.send_email`, wait for and print its JSON result."""
    from proj.mail import validate

    try:
        kwargs = _kwargs(args)
        validate(**kwargs)
    except InvalidEmailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from proj.celery import app

    result = app.send_task("tasks.email.send_email", kwargs=kwargs)
    if args.no_wait:
        print(result.id)
        return 0
    try:
        value = result.get(timeout=args.timeout)
    except Exception as exc:  # the task's own error, re-raised by Celery: report it, don't trace back
        print(f"error: task {result.id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"task_id": result.id, **value}, indent=2))
    return 0
