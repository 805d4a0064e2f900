"""How `proj up` decides ports, Redis and Flower credentials, and what it writes to stack.env."""

from __future__ import annotations

import socket
import stat
import subprocess
from pathlib import Path

import pytest

from proj.settings import Settings
from proj.stack.plan import EMBEDDED_REDIS_FIRST_PORT, StackError, plan, port_free, write_env_file
from tests.harness import free_port


def _settings(tmp_path: Path, **env: str) -> Settings:
    base = {"PROJ_LOCAL_DIR": str(tmp_path), "FLOWER_PORT": str(free_port()), "SMTP_PORT": str(free_port())}
    return Settings.from_env({**base, **env})


def test_flower_password_is_generated_once_kept_private_and_reused(tmp_path: Path) -> None:
    first = plan(_settings(tmp_path), tmp_path)
    second = plan(_settings(tmp_path), tmp_path)
    assert first.flower_user == "admin" and len(first.flower_password) >= 20
    assert (second.flower_user, second.flower_password) == (first.flower_user, first.flower_password)
    assert stat.S_IMODE((tmp_path / "flower-credentials.json").stat().st_mode) == 0o600


def test_flower_credentials_from_the_environment_win(tmp_path: Path) -> None:
    stack = plan(_settings(tmp_path, FLOWER_USER="ops", FLOWER_PASSWORD="from-env"), tmp_path)
    assert (stack.flower_user, stack.flower_password) == ("ops", "from-env")
    assert stack.process_env("flower")["FLOWER_BASIC_AUTH"] == "ops:from-env"
    for name in ("email-1", "files", "beat", "smtp", "redis"):
        assert "from-env" not in stack.process_env(name).values(), f"{name} has no use for the password"


def test_embedded_redis_skips_busy_ports(tmp_path: Path) -> None:
    with socket.socket() as holder:
        if port_free(EMBEDDED_REDIS_FIRST_PORT):  # else something else holds it: just as good
            holder.bind(("127.0.0.1", EMBEDDED_REDIS_FIRST_PORT))
            holder.listen()
        stack = plan(_settings(tmp_path), tmp_path)
    assert stack.redis_server and stack.redis_port > EMBEDDED_REDIS_FIRST_PORT
    assert stack.redis_url == f"redis://127.0.0.1:{stack.redis_port}/0"


def test_given_redis_url_starts_no_redis(tmp_path: Path) -> None:
    stack = plan(_settings(tmp_path, REDIS_URL="redis://10.0.0.5:6379/3"), tmp_path)
    assert stack.redis_server == "" and stack.redis_url == "redis://10.0.0.5:6379/3"
    assert stack.exports()["CELERY_RESULT_BACKEND"] == "redis://10.0.0.5:6379/3"


def test_busy_flower_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StackError, match=f"{port} is in use; set FLOWER_PORT"):
            plan(_settings(tmp_path, FLOWER_PORT=str(port)), tmp_path)


def test_stack_env_survives_bash_quoting(tmp_path: Path) -> None:
    stack = plan(_settings(tmp_path, FLOWER_PASSWORD="it's $HOME; `no`"), tmp_path)
    write_env_file(stack)
    out = subprocess.run(
        ["env", "-i", "bash", "-c", 'source "$1" && printf %s "$FLOWER_PASSWORD"', "_", str(stack.env_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "it's $HOME; `no`"
    assert stat.S_IMODE(stack.env_file.stat().st_mode) == 0o600
