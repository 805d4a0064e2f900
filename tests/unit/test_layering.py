"""Imports point tasks -> proj, never back; services never load Celery."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import proj
from tests.harness import ROOT

# Celery glue by design: the app, its signal handlers and worker hooks, and CLI commands that enqueue.
GLUE = {"proj.celery", "proj.signals", "proj.cli", "proj.bulk", "proj.broker", "proj.worker_events"}


def _service_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(proj.__path__, "proj.")]
    # proj.celery_* modules are glue by name (e.g. proj.celery_delayed: Task base and worker step).
    return [n for n in names if n not in GLUE and not n.endswith("_cli") and not n.startswith("proj.celery_")]


def test_services_do_not_load_celery_or_tasks():
    modules = _service_modules()
    assert "proj.settings" in modules and "proj.errors" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'tasks', 'kombu'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_proj_never_imports_tasks():
    offenders = []
    for path in (ROOT / "proj").rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if stripped.startswith(("import tasks", "from tasks")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert not offenders


def test_proj_package_init_is_empty():
    assert (ROOT / "proj" / "__init__.py").read_text().strip() == ""


def test_only_two_modules_read_the_environment():
    readers = []
    for path in [*(ROOT / "proj").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if "os.environ" in text or "os.getenv" in text:
            readers.append(str(path.relative_to(ROOT)))
    assert set(readers) <= {"proj/settings.py"}, readers
