"""How `proj up` decides ports, Redis and Flower credentials, what it writes and shows, what it cleans up."""

from __future__ import annotations

import contextlib
import datetime
import io
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from honcho.printer import Message

from proj.redis_check import likely_cause, redis_problem, stack_redis_url
from proj.settings import Settings
from proj.stack.lifeline import watch
from proj.stack.plan import EMBEDDED_REDIS_FIRST_PORT, StackError, banner, plan, write_env_file
from proj.stack.view import LiveView
from tests.harness import RedisServer, free_port


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
        # SO_REUSEADDR as port_free and servers bind: a closed connection's TIME_WAIT does not count.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # else something else holds the port: just as good
            holder.bind(("127.0.0.1", EMBEDDED_REDIS_FIRST_PORT))
            holder.listen()
        stack = plan(_settings(tmp_path), tmp_path)
    assert stack.redis_server and stack.redis_port > EMBEDDED_REDIS_FIRST_PORT
    assert stack.redis_url == f"redis://127.0.0.1:{stack.redis_port}/0"


def test_given_redis_url_starts_no_redis(tmp_path: Path) -> None:
    stack = plan(_settings(tmp_path, REDIS_URL="redis://10.0.0.5:6379/3"), tmp_path)
    assert stack.redis_server == "" and stack.redis_url == "redis://10.0.0.5:6379/3"
    assert stack.exports()["CELERY_RESULT_BACKEND"] == "redis://10.0.0.5:6379/3"


def test_rabbitmq_broker_is_kept_with_results_on_the_given_redis(tmp_path: Path) -> None:
    amqp = "amqp://proj:secret@10.0.0.7:5672/proj"
    stack = plan(_settings(tmp_path, CELERY_BROKER_URL=amqp, REDIS_URL="redis://10.0.0.5:6379/3"), tmp_path)
    assert stack.redis_server == ""
    exports = stack.exports()
    assert (exports["CELERY_BROKER_URL"], exports["REDIS_URL"], exports["CELERY_RESULT_BACKEND"]) == (
        amqp,
        "redis://10.0.0.5:6379/3",
        "redis://10.0.0.5:6379/3",
    )
    assert "Broker   amqp://proj:**@10.0.0.7:5672/proj" in banner(stack) and "secret" not in banner(stack)


def test_sentinel_url_starts_no_redis_and_passes_the_master_name_on(tmp_path: Path) -> None:
    url = "sentinel://10.0.0.1:26379/0;sentinel://10.0.0.2:26379"
    stack = plan(_settings(tmp_path, REDIS_URL=url, REDIS_SENTINEL_MASTER="proj-master"), tmp_path)
    assert stack.redis_server == "" and stack.exports()["CELERY_BROKER_URL"] == url
    assert stack.exports()["REDIS_SENTINEL_MASTER"] == "proj-master"
    assert "REDIS_SENTINEL_MASTER" not in plan(_settings(tmp_path), tmp_path).exports()


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


def test_banner_gives_every_address_and_where_the_password_is_never_the_password(tmp_path: Path) -> None:
    stack = plan(_settings(tmp_path, FLOWER_PASSWORD="never-printed"), tmp_path)
    text = banner(stack)
    assert "never-printed" not in text
    assert f"  Redis    {stack.redis_url}  (embedded " in text
    assert f"  SMTP     127.0.0.1:{stack.smtp_port}\n" in text
    assert f"  Flower   {stack.flower_url}  user admin, password from FLOWER_PASSWORD" in text
    for label, path in (
        ("files", stack.files_root),
        ("mail", tmp_path / "mail"),
        ("logs", tmp_path / "logs"),
    ):
        assert f"\n  {label:<8} {path}" in text, label
    assert f"source {stack.env_file}" in text


def test_likely_cause_of_a_dead_redis(tmp_path: Path) -> None:
    url = "redis://127.0.0.1:6390/0"
    given = _settings(tmp_path, REDIS_URL=url)
    assert "No local stack runs now" in likely_cause(url, given)  # no stack.env: left from a stopped one
    assert "`unset REDIS_URL" in likely_cause(url, given, starting_stack=True)
    running = plan(_settings(tmp_path), tmp_path)  # the stack that runs now, on another port
    write_env_file(running)
    assert stack_redis_url(running.env_file) == running.redis_url
    assert likely_cause(url, given) == (
        f"The running local stack's Redis is {running.redis_url}: `source {running.env_file}` again"
    )
    remote = "redis://redis.internal:6379/0"
    assert likely_cause(remote, _settings(tmp_path, REDIS_URL=remote)).startswith("Check REDIS_URL")
    assert likely_cause(url, _settings(tmp_path)).startswith("REDIS_URL is not set")
    sentinels = "sentinel://127.0.0.1:26390/0;sentinel://127.0.0.1:26391"
    on_sentinel = _settings(tmp_path, REDIS_URL=sentinels, REDIS_SENTINEL_MASTER="proj-master")
    assert "REDIS_SENTINEL_MASTER names ('proj-master')" in likely_cause(sentinels, on_sentinel, True)


def test_a_default_url_that_answers_is_not_the_running_stacks_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    running = plan(_settings(tmp_path), tmp_path)
    write_env_file(running)
    # REDIS_URL unset: whatever answers at the default address is not the stack this shell means.
    verdict, why = redis_problem(redis_server.url, _settings(tmp_path)) or ("", "")
    assert verdict == "elsewhere", why
    assert f"not the running local stack's Redis at {running.redis_url}" in why
    assert redis_problem(redis_server.url, _settings(tmp_path, REDIS_URL=redis_server.url)) is None


def test_live_view_shows_few_lines_and_logs_everything(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "files.log").write_text("the previous run\n")
    terminal = (tmp_path / "terminal").open("w")
    view = LiveView(logs, terminal, ready_lines={"beat": b"beat: Starting..."})
    now = datetime.datetime.now()
    view.write(Message("line", b"[tasks] a long banner\n", now, "files", None))
    view.write(Message("line", "files started (pid=42)\n", now, "system", None))
    view.write(Message("line", b"INFO beat: Starting...\n", now, "beat", None))
    view.ready("files")
    view.ready("files")  # once only
    view.close()
    terminal.close()
    shown = (tmp_path / "terminal").read_text().splitlines()
    assert shown == ["  beat       ready", "  files      ready"]
    assert (logs / "files.log").read_text() == "[tasks] a long banner\n"
    assert (logs / "files.log.1").read_text() == "the previous run\n"
    assert "files started (pid=42)" in (logs / "proj-up.log").read_text()


def test_lifeline_kills_the_groups_it_holds_when_proj_up_is_gone(tmp_path: Path) -> None:
    held, released, spared = (subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(3))
    env_file = tmp_path / "stack.env"
    env_file.write_text("export REDIS_URL=redis://127.0.0.1:1/0\n")
    try:
        # The pipe ends without "done": proj up died.
        watch(io.StringIO(f"+{held.pid}\n+{released.pid}\n-{released.pid}\n"), env_file)
        assert held.wait(10) == -signal.SIGKILL
        assert released.poll() is None and not env_file.exists()
        # "done": the stack stopped by itself; nothing is killed.
        assert watch(io.StringIO(f"+{spared.pid}\ndone\n"), env_file) == 0
        assert spared.poll() is None
    finally:
        for proc in (held, released, spared):
            proc.kill()
            proc.wait()
