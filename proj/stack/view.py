"""What `proj up` shows: a few lines as the stack starts and stops; each process's output in its log.

The view is also honcho's printer: every line a process prints goes to `.local/logs/<name>.log`,
honcho's own lines (started, stopped, signals sent) to `.local/logs/proj-up.log`. Writes are single
`os.write` calls, safe from a signal handler that interrupts another write, and a terminal that is
gone (closed window, `make` killed) ends no one: what cannot be shown is dropped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

SUPERVISOR_LOG = "proj-up"
NAME_WIDTH = 10


class LiveView:
    """The terminal's few lines and the per-process log files of one `proj up`."""

    width = NAME_WIDTH  # honcho's Manager sets it; the view pads names itself

    def __init__(
        self,
        logs_dir: Path,
        out: TextIO | None = None,
        ready_lines: Mapping[str, bytes] | None = None,
    ) -> None:
        self.logs_dir = logs_dir
        logs_dir.mkdir(parents=True, exist_ok=True)
        for old in logs_dir.glob("*.log"):  # the previous run's logs stay one run, as *.log.1
            old.replace(old.with_name(old.name + ".1"))
        self._out = out if out is not None else sys.stdout
        self._lock = threading.RLock()  # reentrant: a signal handler may print while a line is written
        self._files: dict[str, int] = {}
        self._ready_lines = dict(ready_lines or {})
        self._ready: set[str] = set()

    def log_path(self, name: str) -> Path:
        """Where the output of process `name` goes."""
        return self.logs_dir / f"{name}.log"

    def say(self, text: str) -> None:
        """Show `text` (one or more lines) and keep it in proj-up.log."""
        data = (text.rstrip("\n") + "\n").encode()
        with self._lock:
            self.append(SUPERVISOR_LOG, time.strftime("%H:%M:%S ").encode() + data)
            with contextlib.suppress(OSError, ValueError):  # a closed terminal or pipe
                os.write(self._out.fileno(), data)

    def process(self, name: str, what: str) -> None:
        """One line about process `name`."""
        self.say(f"  {name:<{NAME_WIDTH}} {what}".rstrip())

    def ready(self, name: str, detail: str = "") -> None:
        """Process `name` is ready: one line, the first time only."""
        with self._lock:
            if name in self._ready:
                return
            self._ready.add(name)
        self.process(name, f"ready  {detail}")

    def is_ready(self, name: str) -> bool:
        """Whether `name` has had its ready line."""
        return name in self._ready

    def append(self, name: str, data: bytes) -> None:
        """Add `data` to the log of `name`."""
        with self._lock:
            fd = self._files.get(name)
            if fd is None:
                fd = os.open(self.log_path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._files[name] = fd
            with contextlib.suppress(OSError):  # a full disk must not stop the stack
                os.write(fd, data)

    def write(self, message: Any) -> None:
        """honcho's Printer interface: a line of a process, or of honcho itself ("system")."""
        data = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        if message.name in (None, "system"):
            self.append(SUPERVISOR_LOG, message.time.strftime("%H:%M:%S ").encode() + data)
            return
        self.append(message.name, data)
        marker = self._ready_lines.get(message.name)
        if marker and marker in data:
            self.ready(message.name)

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._files.clear()
