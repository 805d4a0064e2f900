"""One line per fault scenario, `scenario: sent=N done=N lost=N duplicated=N resumed_in=S`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Lines of this session, printed again at the end of the run (tests/conftest.py) so CI shows them.
LINES: list[str] = []


@dataclass
class Outcome:
    """What a scenario sent, what completed, and what went missing or happened twice."""

    name: str
    sent: int
    done: int
    lost: int
    duplicated: int
    resumed_in: float | None = None
    note: str = ""

    def line(self) -> str:
        resumed = "-" if self.resumed_in is None else f"{self.resumed_in:.1f}"
        text = (
            f"{self.name}: sent={self.sent} done={self.done} lost={self.lost} "
            f"duplicated={self.duplicated} resumed_in={resumed}"
        )
        return f"{text} ({self.note})" if self.note else text


def report(outcome: Outcome) -> Outcome:
    """Print the scenario's line now and keep it for the end-of-run summary."""
    line = outcome.line()
    print(line)
    LINES.append(line)
    return outcome


def runs_by_id(*logs: str) -> dict[str, int]:
    """How often each task id ran to completion, from worker logs ("Task name[id] succeeded")."""
    import re

    counts: dict[str, int] = {}
    for log in logs:
        for task_id in re.findall(r"Task [\w.]+\[([0-9a-f-]{36})\] succeeded", log):
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def scaled(count: int) -> int:
    """`count` times PROJ_FAULT_SCALE (default 1), so the scenarios re-run at other sizes."""
    import os

    return max(1, int(count * float(os.environ.get("PROJ_FAULT_SCALE", "1"))))


def settle(results: list[Any], timeout: float) -> list[Any]:
    """Wait for every result within one shared deadline; return those still not ready."""
    import contextlib
    import time

    from celery.exceptions import TimeoutError as NotReady

    deadline = time.monotonic() + timeout
    for result in results:
        with contextlib.suppress(NotReady):
            result.get(timeout=max(deadline - time.monotonic(), 0.1), propagate=False)
    return [r for r in results if not r.ready()]
