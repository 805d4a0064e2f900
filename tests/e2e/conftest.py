"""One `proj up` shared by the end-to-end tests of the stack and of Flower in a browser."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.localstack import LocalStack, stack_environ


@pytest.fixture(scope="package")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """`proj up` with the embedded Redis (REDIS_URL unset), free ports and a temporary .local/.

    Package scope: stopped after the last end-to-end test, so it does not idle through the rest.
    """
    local_dir = tmp_path_factory.mktemp("stack") / "local"
    stack = LocalStack(local_dir, stack_environ(local_dir)).start()
    yield stack
    left = stack.stop()
    assert not left, f"processes left running after Ctrl-C: {left}\n{stack.log()[-3000:]}"
    assert stack.proc is not None and stack.proc.returncode == 0, stack.log()[-3000:]
    assert stack.log().rstrip().endswith("proj up: stopped"), stack.log()[-3000:]
