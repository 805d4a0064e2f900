"""The installed Celery, kombu, redis-py and Flower are the minor versions proj's layer was tested with."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import version

import pytest

from proj.integration.upstream import TESTED_WITH, TOUCHED
from tests.harness import ROOT


def _minor(distribution: str) -> str:
    return ".".join(version(distribution).split(".")[:2])


def _missing(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        module_name, _, path = name.partition(":")
        try:
            target: object = importlib.import_module(module_name)
            for part in path.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            missing.append(name)
    return missing


@pytest.mark.parametrize("distribution", sorted(TESTED_WITH))
def test_installed_minor_version_is_the_one_the_layer_was_tested_with(distribution):
    installed, tested = _minor(distribution), TESTED_WITH[distribution]
    assert installed == tested, (
        f"{distribution} {version(distribution)} is installed; proj's layer (proj/integration) was "
        f"tested with {tested}.x. Re-check these internals it touches (docs/internals.md, 'Pins and "
        f"upgrading'), run `make test` and `make upstream`, then update TESTED_WITH and the pin in "
        f"pyproject.toml:\n  " + "\n  ".join(TOUCHED[distribution])
    )


@pytest.mark.parametrize("distribution", sorted(TOUCHED))
def test_every_touched_internal_still_exists(distribution):
    assert not _missing(TOUCHED[distribution]), f"gone from {distribution} {version(distribution)}"


def test_pyproject_pins_the_tested_minor_versions():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for distribution, minor in TESTED_WITH.items():
        pattern = rf'"{distribution}(\[[a-z,]+\])?=={re.escape(minor)}\.\*"'
        assert re.search(pattern, text), f"pyproject.toml does not pin {distribution}=={minor}.*"


def test_a_missing_internal_is_reported():
    assert _missing(["kombu.transport.redis:Channel.no_such_method"]) == [
        "kombu.transport.redis:Channel.no_such_method"
    ]
