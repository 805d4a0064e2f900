"""Nothing a `proj up` started outlives it, even when it is SIGKILLed and runs no cleanup of its own.

Two parts. Every process `proj up` starts itself (Redis, SMTP, honcho's relay processes and the
Procfile commands they run) asks the kernel for SIGKILL when its parent goes (PR_SET_PDEATHSIG,
Linux). What those start in turn (a prefork worker's pool) does not inherit that, so a watcher,
`python -m proj.stack.lifeline ENV_FILE` in a session of its own, holds the process group of each
of them: `proj up` writes `+PGID` when one starts, `-PGID` once it is gone, and `done` when the stack
has stopped. When the pipe closes without `done`, `proj up` died: the watcher SIGKILLs every group
still held and removes the stack.env that described the dead stack.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl: Callable[..., int] = libc.prctl
    return prctl


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent (`parent_pid`) exits."""
    prctl = _prctl()
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent went before the call: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def preexec_die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn: the child is SIGKILLed when the thread that starts it ends with its process.

    Called in the process (and thread) that starts the child, which must outlive the child's
    normal life: the kernel takes the starting thread as the parent.
    """
    prctl = _prctl()  # looked up before the fork: nothing is loaded in the child
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(137)

    return preexec


class Lifeline:
    """`proj up`'s end of the pipe to the watcher process."""

    def __init__(self, env_file: Path, log: IO[Any] | int = subprocess.DEVNULL) -> None:
        self._watcher = subprocess.Popen(
            [sys.executable, "-m", "proj.stack.lifeline", str(env_file)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            start_new_session=True,  # neither Ctrl-C nor a closed terminal reaches it
        )
        assert self._watcher.stdin is not None
        self.fd = self._watcher.stdin.fileno()

    def hold(self, pgid: int) -> None:
        """Kill this process group should `proj up` die."""
        self._send(f"+{pgid}\n")

    def release(self, pgid: int) -> None:
        """The group is gone (or stopped by `proj up`): forget it."""
        self._send(f"-{pgid}\n")

    def done(self) -> None:
        """Everything stopped: the watcher exits and kills nothing."""
        self._send("done\n")
        with contextlib.suppress(OSError):
            assert self._watcher.stdin is not None
            self._watcher.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._watcher.wait(5)

    def _send(self, line: str) -> None:
        # One write of a few bytes: atomic on a pipe, so a death mid-line never leaves half a PGID.
        with contextlib.suppress(OSError):
            os.write(self.fd, line.encode())


def watch(lines: IO[str], env_file: Path) -> int:
    """Read `+PGID`/`-PGID`/`done` until EOF; at EOF without `done`, SIGKILL the groups held."""
    groups: set[int] = set()
    for line in lines:
        word = line.strip()
        if word == "done":
            return 0
        if word[:1] in "+-" and word[1:].isdigit():
            (groups.add if word[0] == "+" else groups.discard)(int(word[1:]))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    env_file.unlink(missing_ok=True)  # it describes a stack that is gone
    if groups:
        print(f"proj up is gone: killed the process groups {sorted(groups)}", file=sys.stderr)
    return 0


def main() -> None:
    """Entry point of the watcher process."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(watch(sys.stdin, Path(sys.argv[1])))


if __name__ == "__main__":
    main()
