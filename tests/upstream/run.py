"""kombu's and Celery's own integration tests, stock and with proj's layer switched in, compared.

Usage: .venv/bin/python tests/upstream/run.py [--jobs N] [--options proj|upstream] [--suite NAME ...]

Downloads the sdists of the installed kombu and Celery (cached in .local/upstream/), extracts their
`t/` directories, and runs each suite twice, each run in its own pytest process against its own
private redis-server on a free 127.0.0.1 port: once with stock components, once with proj's layer
(tests/upstream/proj_layer_plugin.py). Every test that passes stock must pass with proj's layer,
unless tests/upstream/known_differences.toml lists it with a reason; a test that fails with proj's
layer is run once more on its own before it counts as a difference (upstream marks many of these
tests flaky and has its CI rerun them). Exits 1 on an unexplained difference, 2 when a run broke.
See docs/upstream-tests.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import RedisServer  # noqa: E402  (needs ROOT on sys.path)

CACHE = ROOT / ".local" / "upstream"
ALLOW_LIST = HERE / "known_differences.toml"
PYTHON = sys.executable
MODES = ("stock", "proj")
# Per test (pytest-timeout; upstream's own markers may raise it) and per pytest process.
TEST_TIMEOUT = 90
JOB_TIMEOUT = 540
# Celery settings proj's celeryconfig turns on that the layer acts on (task events: BatchedTaskEvents
# and the unawaited PUBLISH), given to both runs through Celery's own override file.
CELERY_OVERRIDES = {"worker_send_task_events": True, "task_send_sent_event": True}


@dataclass(frozen=True)
class Suite:
    name: str
    package: str
    files: tuple[str, ...]  # paths or node id prefixes, relative to the extracted sdist
    plugins: tuple[str, ...] = ()
    deselect: tuple[str, ...] = ()  # node id prefixes another suite runs
    shard: str = ""  # "i/n": every n-th collected test from the i-th (proj_layer_plugin)


CELERY = ("celery.contrib.pytest",)  # Celery's fixtures, registered as pytest-celery would
CANVAS = "t/integration/test_canvas.py"
# Celery's canvas tests, the long ones, in five processes (chords in three shards): they mostly wait on
# the worker, one task at a time (upstream's session worker has one prefork child), so separate
# processes overlap the waits.
SUITES = (
    Suite("kombu-redis", "kombu", ("t/integration/test_redis.py", "t/integration/test_redis_brpop_qos.py")),
    Suite("celery-tasks", "celery", ("t/integration/test_tasks.py",), CELERY),
    *(
        Suite(f"celery-canvas-chord-{i}", "celery", (f"{CANVAS}::test_chord",), CELERY, shard=f"{i}/3")
        for i in range(3)
    ),
    Suite("celery-canvas-chain", "celery", (f"{CANVAS}::test_chain",), CELERY),
    Suite(
        "celery-canvas-rest",
        "celery",
        (CANVAS, "t/integration/test_group_chains.py"),
        CELERY,
        (f"{CANVAS}::test_chord", f"{CANVAS}::test_chain"),
    ),
    Suite(
        "celery-redis-backend",
        "celery",
        (
            "t/integration/test_redis_backend.py",
            "t/integration/test_backend_leak_in_fixture_teardown.py",
            "t/integration/test_request_backend_down.py",
        ),
        CELERY,
    ),
)


@dataclass
class Run:
    suite: Suite
    mode: str
    outcomes: dict[str, str] = field(default_factory=dict)  # node id -> passed/failed/error/skipped
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None
    evidence: dict[str, object] = field(default_factory=dict)
    problem: str = ""

    def count(self, outcome: str) -> int:
        return sum(1 for value in self.outcomes.values() if value == outcome)


# --- sources -------------------------------------------------------------------------------------


def installed_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("kombu", "celery")}


def fetch_sources(versions: dict[str, str]) -> dict[str, Path]:
    """The `t/` trees (and pytest settings) of the installed versions' sdists, downloaded once."""
    sdists = CACHE / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    wanted = {name: sdists / f"{name}-{version}.tar.gz" for name, version in versions.items()}
    missing = [f"{name}=={versions[name]}" for name, path in wanted.items() if not path.exists()]
    if missing:
        print(f"downloading sdists: {' '.join(missing)}", flush=True)
        pip = [PYTHON, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, *missing, "-d", str(sdists)], check=True)
    trees = {}
    for name, path in wanted.items():
        tree = CACHE / f"{name}-{versions[name]}"
        if not (tree / "t" / "integration").is_dir():
            extract_tests(path, tree)
        trees[name] = tree
    return trees


def extract_tests(sdist: Path, tree: Path) -> None:
    """Only `t/` and the pytest settings: the package itself must come from .venv, not the sdist."""
    top = sdist.name.removesuffix(".tar.gz")
    keep = (f"{top}/t/", f"{top}/pyproject.toml", f"{top}/setup.cfg")
    staging = tree.with_name(tree.name + ".partial")
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(keep) or m.name in keep]
        for member in members:
            member.name = member.name.removeprefix(f"{top}/")
        archive.extractall(staging, members=members, filter="data")
    staging.rename(tree)


# --- one pytest run ------------------------------------------------------------------------------


def pytest_command(suite: Suite, junit: Path, select: Iterable[str], deselect: Iterable[str]) -> list[str]:
    command = [PYTHON, "-m", "pytest", "-p", "proj_layer_plugin", "-p", "no:cacheprovider"]
    for plugin in suite.plugins:
        command += ["-p", plugin]
    command += [
        f"--timeout={TEST_TIMEOUT}",
        "-q",
        "-rfE",
        "--no-header",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit2",
        "-W",
        "ignore::pytest.PytestUnknownMarkWarning",
    ]
    for node in deselect:
        command += ["--deselect", node]
    return command + (list(select) or list(suite.files))


def run_pytest(
    suite: Suite, mode: str, tree: Path, options: str, out: Path, select: Iterable[str] = (), tag: str = ""
) -> Run:
    """One pytest process on one private Redis, stopped by PID (its process group) if it overruns."""
    run = Run(suite, mode)
    stem = f"{suite.name}.{mode}{tag}"
    junit, run.log, evidence = out / f"{stem}.xml", out / f"{stem}.log", out / f"{stem}.evidence.json"
    for path in (junit, evidence):
        path.unlink(missing_ok=True)
    redis = RedisServer().start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/0"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_", "PROJ_"))}
        env.update(
            PYTHONPATH=str(HERE),
            PYTHONDONTWRITEBYTECODE="1",
            REDIS_HOST="127.0.0.1",
            REDIS_PORT=str(redis.port),
            REDIS_6379_TCP=str(redis.port),
            TEST_BROKER=url,
            TEST_BACKEND=url,
            PROJ_UPSTREAM_LAYER=mode,
            PROJ_UPSTREAM_OPTIONS=options,
            PROJ_UPSTREAM_EVIDENCE=str(evidence),
            PROJ_UPSTREAM_SHARD="" if select else suite.shard,
        )
        deselect = [] if select else [*suite.deselect, *(e["test"] for e in not_run(suite))]
        started = time.monotonic()
        with run.log.open("wb") as log:
            proc = subprocess.Popen(
                pytest_command(suite, junit, select, deselect),
                cwd=tree,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a hung Celery worker child goes with it
            )
            try:
                run.returncode = proc.wait(JOB_TIMEOUT)
            except subprocess.TimeoutExpired:
                run.problem = f"killed after {JOB_TIMEOUT} s"
                stop_group(proc)
        run.seconds = time.monotonic() - started
    finally:
        redis.stop()
    if junit.exists():
        run.outcomes = read_junit(junit)
    elif not run.problem:
        run.problem = f"no junit report (exit {run.returncode})"
    if evidence.exists():
        run.evidence = json.loads(evidence.read_text())
    return run


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the pytest process, then SIGKILL to the group it leads (started by us)."""
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def read_junit(path: Path) -> dict[str, str]:
    """Node id -> outcome; the plugin records each test's node id as a junit property."""
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        node = next(
            (p.get("value") for p in case.iter("property") if p.get("name") == "nodeid"),
            f"{case.get('classname')}::{case.get('name')}",
        )
        tags = {child.tag for child in case}
        outcome = "passed"
        if "skipped" in tags:
            outcome = "skipped"
        if "failure" in tags:
            outcome = "failed"
        if "error" in tags:  # setup/teardown errors too: such a test did not pass cleanly
            outcome = "error"
        if outcomes.get(str(node)) in ("failed", "error"):  # a teardown error adds a second <testcase>
            continue
        outcomes[str(node)] = outcome
    return outcomes


def check_evidence(run: Run) -> str:
    """'' when the run used what its mode says; else what it used instead."""
    expect_proj = run.mode == "proj"
    transport = str(run.evidence.get("kombu_transport", {}))
    problems = []
    if ("proj.integration.kombu_transport" in transport) != expect_proj:
        problems.append(f"kombu transport {transport}")
    celery = run.evidence.get("celery")
    if run.suite.package == "celery" and run.outcomes:
        if not isinstance(celery, dict):
            problems.append("no record of Celery's session app")
        else:
            wanted = {
                "backend": "proj.integration.result_backend",
                "amqp": "proj.integration.producer",
                "consumer_steps": "proj.integration.task_events",
            }
            if not celery.get("finalized"):  # the steps are added when the app is finalized
                wanted.pop("consumer_steps")
            for key, module in wanted.items():
                if (module in str(celery.get(key))) != expect_proj:
                    problems.append(f"{key} {celery.get(key)}")
    return "; ".join(problems)


# --- the allow-list ------------------------------------------------------------------------------


def load_allow_list() -> dict[str, list[dict[str, str]]]:
    data = tomllib.loads(ALLOW_LIST.read_text()) if ALLOW_LIST.exists() else {}
    for key in ("difference", "not_run"):
        for entry in data.get(key, []):
            if not {"suite", "test", "reason"} <= entry.keys():
                raise SystemExit(f"{ALLOW_LIST}: each [[{key}]] needs suite, test and reason: {entry}")
    return {key: data.get(key, []) for key in ("difference", "not_run")}


_ALLOW: dict[str, list[dict[str, str]]] = {}


def not_run(suite: Suite) -> list[dict[str, str]]:
    return [e for e in _ALLOW.get("not_run", []) if e["suite"] == suite.name]


def allowed(suite: Suite, node: str) -> dict[str, str] | None:
    for entry in _ALLOW.get("difference", []):
        if entry["suite"] == suite.name and fnmatchcase(node, entry["test"]):
            return entry
    return None


# --- the whole comparison ------------------------------------------------------------------------


@dataclass
class Verdict:
    suite: Suite
    stock: Run
    proj: Run
    differences: dict[str, str] = field(default_factory=dict)  # node -> proj outcome
    allowed: dict[str, str] = field(default_factory=dict)  # node -> reason
    flaky: dict[str, str] = field(default_factory=dict)  # node -> outcome of the first proj run
    unexplained: dict[str, str] = field(default_factory=dict)
    proj_only: list[str] = field(default_factory=list)  # passed with proj only
    stale: list[str] = field(default_factory=list)  # allow-listed but passing with proj now


def compare(stock: Run, proj: Run, tree: Path, options: str, out: Path) -> Verdict:
    verdict = Verdict(stock.suite, stock, proj)
    for node, outcome in stock.outcomes.items():
        if outcome == "passed" and proj.outcomes.get(node) != "passed":
            verdict.differences[node] = proj.outcomes.get(node, "missing")
    verdict.proj_only = sorted(
        n for n, o in proj.outcomes.items() if o == "passed" and stock.outcomes.get(n) not in (None, "passed")
    )
    for node in verdict.differences:
        entry = allowed(stock.suite, node)
        if entry is not None:
            verdict.allowed[node] = entry["reason"]
    to_confirm = sorted(set(verdict.differences) - set(verdict.allowed))
    if to_confirm:  # once more, on their own: a flaky failure passes now, a real difference does not
        again = run_pytest(stock.suite, "proj", tree, options, out, select=to_confirm, tag=".rerun")
        for node in to_confirm:
            if again.outcomes.get(node) == "passed":
                verdict.flaky[node] = verdict.differences[node]
            else:
                verdict.unexplained[node] = verdict.differences[node]
    verdict.stale = [
        e["test"]
        for e in _ALLOW.get("difference", [])
        if e["suite"] == stock.suite.name and not any(fnmatchcase(n, e["test"]) for n in verdict.allowed)
    ]
    return verdict


def status_of(verdict: Verdict, node: str) -> str:
    if node in verdict.allowed:
        return f"allowed: {verdict.allowed[node]}"
    if node in verdict.flaky:
        return "flaky: passed when run again on its own"
    return "UNEXPLAINED"


def report(verdicts: list[Verdict], broken: list[str], seconds: float) -> int:
    header = f"{'suite':<22} {'mode':<6} {'passed':>6} {'failed':>6} {'error':>6} {'skipped':>7} {'time':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for verdict in verdicts:
        for run in (verdict.stock, verdict.proj):
            print(
                f"{run.suite.name:<22} {run.mode:<6} {run.count('passed'):>6} {run.count('failed'):>6} "
                f"{run.count('error'):>6} {run.count('skipped'):>7} {run.seconds:>6.0f}s"
            )
    print("\npassed with stock, not with proj's layer:")
    lines = [
        f"  [{v.suite.name}] {node}  ({outcome})  {status_of(v, node)}"
        for v in verdicts
        for node, outcome in sorted(v.differences.items())
    ]
    lines += [
        f"  note [{v.suite.name}] passed with proj's layer only: {n}" for v in verdicts for n in v.proj_only
    ]
    lines += [
        f"  note [{v.suite.name}] allow-list entry matches no difference now: {p}"
        for v in verdicts
        for p in v.stale
    ]
    lines += [f"BROKEN: {problem}" for problem in broken]
    print("\n".join(lines) or "  none")
    unexplained = sum(len(v.unexplained) for v in verdicts)
    print(
        f"\n{unexplained} unexplained difference(s), {len(broken)} broken run(s), wall time {seconds:.0f} s"
    )
    if broken:
        return 2
    return 1 if unexplained else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--jobs", type=int, default=2 * len(SUITES), help="pytest processes at once (default: all)"
    )
    parser.add_argument(
        "--options",
        choices=("proj", "upstream"),
        default="proj",
        help="transport options and Celery settings for both runs: proj's (default) or upstream's defaults",
    )
    parser.add_argument(
        "--suite", action="append", choices=[s.name for s in SUITES], help="only these suites (repeatable)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    _ALLOW.update(load_allow_list())
    versions = installed_versions()
    trees = fetch_sources(versions)
    overrides = CELERY_OVERRIDES if args.options == "proj" else {}
    (trees["celery"] / "integration-tests-config.json").write_text(json.dumps(overrides))
    suites = [s for s in SUITES if not args.suite or s.name in args.suite]
    out = CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"kombu {versions['kombu']}, celery {versions['celery']}: {len(suites)} suite(s) x {MODES}, "
        f"options={args.options}, {args.jobs} at once; logs and junit in {out}",
        flush=True,
    )

    def one(job: tuple[Suite, str]) -> Run:
        suite, mode = job
        run = run_pytest(suite, mode, trees[suite.package], args.options, out)
        print(f"  {suite.name} {mode}: {run.count('passed')} passed in {run.seconds:.0f} s", flush=True)
        return run

    jobs = [(suite, mode) for suite in suites for mode in MODES]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = dict(zip(jobs, pool.map(one, jobs), strict=True))
    broken = []
    for run in runs.values():
        problem = run.problem or check_evidence(run)
        if problem:
            broken.append(f"{run.suite.name} {run.mode}: {problem}; log: {run.log}")
    verdicts = [
        compare(runs[(s, "stock")], runs[(s, "proj")], trees[s.package], args.options, out) for s in suites
    ]
    summary = {
        "versions": versions,
        "options": args.options,
        "runs": {
            f"{r.suite.name}.{r.mode}": {"outcomes": r.outcomes, "seconds": round(r.seconds)}
            for r in runs.values()
        },
        "differences": {v.suite.name: v.differences for v in verdicts},
        "unexplained": {v.suite.name: v.unexplained for v in verdicts},
        "flaky": {v.suite.name: v.flaky for v in verdicts},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return report(verdicts, broken, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
