"""The `proj` command: one subcommand per module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import redis

from proj.credentials import scrub
from proj.redis_check import redis_problem
from proj.settings import REDIS_BROKER_SCHEMES, get_settings

# name -> module exposing `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("proj.cli.up", "start the whole local stack (Redis, workers, beat, Flower, SMTP)"),
    "status": ("proj.cli.status", "queues, depths, oldest message age, workers"),
    "dlq": ("proj.cli.dlq", "list, show, replay or purge tasks that failed for good"),
    "send-email": ("proj.cli.send_email", "enqueue one email and print its result"),
    "process-file": ("proj.cli.process_file", "copy a file into storage, run the pipeline, follow progress"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="proj", description="Operate the proj task service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = _module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a command whose module is not built yet is simply not offered
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(module=module_name)
        module.add_arguments(command)
    return parser


def _module(name: str) -> argparse.Namespace:
    """Import a subcommand module by name."""
    return importlib.import_module(name)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `proj` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command != "up":  # `proj up` may start the Redis itself; it checks a given one (proj.cli.up)
        problem = _redis_problem()
        if problem:  # two lines, not a traceback or retries: what is wrong and the likely cause
            print(f"proj {args.command}: {problem}", file=sys.stderr)
            sys.exit(1)
    try:
        code = _module(args.module).run(args)
    except Exception as exc:
        if not _lost_connection(exc):
            raise
        # Redis answered the check and went away while the command ran: one line, as above.
        print(f"proj {args.command}: lost the connection to Redis: {scrub(str(exc))}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def _redis_problem() -> str | None:
    """Why the Redis of the broker, the results or proj's stores cannot be used, or None."""
    import celeryconfig

    settings = get_settings()
    urls = dict.fromkeys([settings.redis_url, celeryconfig.broker_url, celeryconfig.result_backend])
    for url in urls:
        problem = redis_problem(url, settings) if url.startswith(REDIS_BROKER_SCHEMES) else None
        if problem:
            return problem[1]
    return None


def _lost_connection(exc: BaseException) -> bool:
    """A connection error of redis-py or kombu (imported only if the command loaded it)."""
    kombu_errors = sys.modules.get("kombu.exceptions")
    operational = (kombu_errors.OperationalError,) if kombu_errors else ()
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, *operational))


if __name__ == "__main__":
    main()
