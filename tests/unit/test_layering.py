"""The layout states the architecture: which package may import which, no cycles, two env readers."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys

import proj
from tests.harness import ROOT

# Services: plain Python over SMTP, files and Redis. They never load Celery, kombu or the layer.
SERVICES = ("proj.mail", "proj.files", "proj.stores", "proj.settings", "proj.errors", "proj.credentials")
NOT_FOR_SERVICES = ("celery", "kombu", "tasks", "proj.integration", "proj.cli", "proj.stack")
# What each package must never import (by package prefix).
FORBIDDEN = {
    **{
        service: ("celery", "kombu", "tasks", "proj.integration", "proj.cli", "proj.stack")
        for service in SERVICES
    },
    "proj.integration": ("tasks", "proj.cli", "proj.stack", "rich"),
    "proj.stack": ("tasks", "proj.cli", "proj.integration"),
    "proj.celery": ("tasks", "proj.cli", "proj.stack", "rich"),
}


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(proj.__path__, "proj.")]


def _imports(module: str) -> set[str]:
    """Every module `module` imports, at its top or inside a function."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_each_package_imports_only_what_its_layer_may():
    offenders = []
    for module in _modules():
        for package, banned in FORBIDDEN.items():
            if not _under(module, package):
                continue
            offenders += [
                f"{module} -> {name}" for name in _imports(module) if any(_under(name, b) for b in banned)
            ]
    assert not offenders, offenders


def test_no_import_cycles_between_proj_modules():
    modules = set(_modules())
    graph = {m: {n for n in _imports(m) if n in modules and n != m} for m in modules}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    done: set[str] = set()
    for module in sorted(modules):
        if module not in done:
            visit(module, [module])
    assert not cycles, cycles


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_services_load_neither_celery_nor_tasks_nor_the_layer():
    services = [m for m in _modules() if any(_under(m, s) for s in SERVICES)]
    assert "proj.stores.ledger" in services and "proj.mail.service" in services
    loaded = _loaded_after("\n".join(f"import {m}" for m in services))
    bad = sorted(
        m for m in loaded if m.split(".")[0] in ("celery", "kombu", "tasks") or _under(m, "proj.integration")
    )
    assert not bad, bad


def test_the_app_loads_neither_rich_nor_the_cli_nor_the_stack():
    loaded = _loaded_after("import proj.celery")
    assert "proj.integration.signals" in loaded  # the dead-letter handler is connected
    bad = sorted(
        m for m in loaded if m.split(".")[0] == "rich" or _under(m, "proj.cli") or _under(m, "proj.stack")
    )
    assert not bad, bad


def test_proj_package_init_is_empty():
    assert (ROOT / "proj" / "__init__.py").read_text().strip() == ""


def test_only_two_modules_read_the_environment():
    readers = []
    for path in [*(ROOT / "proj").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if "os.environ" in text or "os.getenv" in text:
            readers.append(str(path.relative_to(ROOT)))
    assert set(readers) <= {"proj/settings.py"}, readers
