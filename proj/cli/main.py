"""The `proj` command: one subcommand per module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from proj.credentials import redis_refusal
from proj.settings import get_settings

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
        refusal = redis_refusal(get_settings().redis_url)
        if refusal:  # one line, not a traceback: wrong credentials are not a bug of the command
            print(f"proj {args.command}: {refusal}", file=sys.stderr)
            sys.exit(1)
    sys.exit(_module(args.module).run(args))


if __name__ == "__main__":
    main()
