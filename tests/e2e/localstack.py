"""`proj up` as a real subprocess, stopped like a terminal's Ctrl-C, its process tree watched with psutil."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.harness import ROOT, free_port, wait_for

VENV_BIN = Path(sys.executable).parent
# Variables of the test session that must not leak into the stack: it decides its Redis itself.
_UNSET = (
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "FLOWER_USER",
    "FLOWER_PASSWORD",
    "FILES_ROOT",
    "SMTP_HOST",
)


def stack_environ(local_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a `proj up` on free ports with its .local/ in `local_dir`."""
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env.update(
        PROJ_LOCAL_DIR=str(local_dir),
        FLOWER_PORT=str(free_port()),
        SMTP_PORT=str(free_port()),
        REDIS_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


@dataclass
class LocalStack:
    """One `proj up` process and what it wrote."""

    local_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mktemp(prefix="proj-up-", suffix=".log")))

    @property
    def env_file(self) -> Path:
        return self.local_dir / "stack.env"

    def start(self, timeout: float = 90) -> LocalStack:
        """Run `proj up` (the console script a user runs) and wait until it writes stack.env."""
        # Its own process group, as a shell gives a foreground job: Ctrl-C is a SIGINT to that group.
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "proj"), "up"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._ready, timeout=timeout, interval=0.1, what="proj up to write stack.env")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"proj up exited with {self.proc.returncode}:\n{self.log()}")
        return self.env_file.exists()

    def log(self) -> str:
        """What `proj up` printed (its terminal)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def process_log(self, name: str) -> str:
        """The full output of one process (.local/logs/<name>.log; proj-up for the supervisor's own)."""
        return process_log(self.local_dir, name)

    def pids(self, name: str) -> list[int]:
        """The PIDs `proj up` started `name` with, in order."""
        return started_pids(self.local_dir, name)

    def exports(self) -> dict[str, str]:
        """What `source stack.env` sets, read by bash itself from an empty environment."""
        out = subprocess.run(
            ["env", "-i", "bash", "-c", 'source "$1" && env -0', "_", str(self.env_file)],
            capture_output=True,
            check=True,
        ).stdout.decode()
        pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
        return {k: v for k, v in pairs if k not in ("PWD", "SHLVL", "_")}

    def sourced(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `command` in a bash that sourced stack.env, as another shell of the user would."""
        return subprocess.run(
            self._sourced_argv(command),
            cwd=ROOT,
            env=self._shell_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def sourced_popen(self, command: str) -> subprocess.Popen[str]:
        """Start `command` in such a shell, its output readable line by line."""
        return subprocess.Popen(
            self._sourced_argv(command), cwd=ROOT, env=self._shell_env(), stdout=subprocess.PIPE, text=True
        )

    def _sourced_argv(self, command: str) -> list[str]:
        return ["bash", "-c", f'source "$1" && {command}', "_", str(self.env_file)]

    def _shell_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _UNSET}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def tree(self) -> list[psutil.Process]:
        """`proj up` and every process under it, collected by PID."""
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the foreground process group `proj up` leads."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> list[psutil.Process]:
        """Ctrl-C (or `kill -TERM PID`), wait, and return what still runs; that is then SIGKILLed by PID."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        tree = self.tree()
        if sig == signal.SIGINT:
            self.interrupt()
        else:
            os.kill(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        _, alive = psutil.wait_procs(tree, timeout=10)
        alive = [p for p in alive if running(p)]
        for process in alive:
            process.kill()
        return alive


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_log(local_dir: Path, name: str) -> str:
    """The full output of one process of the stack in `local_dir` (proj-up: the supervisor's lines)."""
    path = local_dir / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def started_pids(local_dir: Path, name: str) -> list[int]:
    """The PIDs honcho reported for `name` (in .local/logs/proj-up.log), in order of start."""
    found = re.findall(
        rf"^\S+ {re.escape(name)} started \(pid=(\d+)\)$", process_log(local_dir, "proj-up"), re.M
    )
    return [int(pid) for pid in found]
