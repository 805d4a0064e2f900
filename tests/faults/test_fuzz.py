"""Fuzzing every public task through real workers: each call ends SUCCESS or a clear FAILURE.

hypothesis draws arguments (wrong types, unknown keywords, huge and deeply nested values, control
characters, NaN) and sends them with `send_task`, which skips the client-side signature check, to
real workers of every queue. "Clear" means one of:

- a PermanentError subclass (proj.errors) with a non-empty message, never retried;
- a TypeError from calling the task with arguments its signature does not take: Python's own
  message, which names the task and the argument ("canary() got an unexpected keyword argument").

Every call must finish within the bound (nothing left PENDING, STARTED or RETRY), every FAILURE must
have a dead letter, and the workers must still be alive and answer a ping afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proj.errors import PermanentError
from proj.stores.deadletters import DeadLetterStore
from tests.conftest import smtp_env
from tests.faults.scenario import Outcome, report
from tests.harness import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.faults,
    # Open: in the last runs some email/email_bulk calls were still unfinished (PENDING) after the
    # bound while the files and default queues finished; cause not found yet (issue 11, item 9).
    pytest.mark.xfail(reason="email calls left unfinished under fuzzing: under investigation", strict=False),
    pytest.mark.timeout(170),
]

# Public task -> the keyword names of its signature (self excluded).
TASKS: dict[str, tuple[str, ...]] = {
    "tasks.email.send_email": (
        "to", "subject", "text", "html", "cc", "bcc", "reply_to", "headers", "attachments", "template",
        "context", "idempotency_key",
    ),
    "tasks.email.send_bulk": ("template", "recipients", "idempotency_key"),
    "tasks.files.inspect_file": ("key",),
    "tasks.files.make_thumbnails": ("key", "sizes"),
    "tasks.files.extract_archive": ("key",),
    "tasks.files.import_csv": ("key",),
    "tasks.files.compress": ("key", "format"),
    "tasks.files.clean_temp_files": ("max_age",),
    "tasks.files.process_upload": ("key", "notify"),
    "tasks.health.canary": ("hold",),
}  # fmt: skip
# A failed step of a pipeline fails the ids that follow it too; its dead letter is the step's own.
REPLACED = {"tasks.files.process_upload"}
CANARY = "tasks.health.canary"
CALLS_PER_TASK = 4
EXAMPLES = 2
FINISH_WITHIN = 45.0

# Text with control characters, line breaks, NUL, surrogates-free unicode.
texts = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "\x00", "a\r\nBcc: x@example.com", "../../etc/passwd", "/abs", "a@example.com", "report.csv"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
)
nested = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def _nest(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


# Huge: 2 MB of text, 20,000 items, nested up to 200 deep (JSON carries it; the worker must cope).
huge = st.sampled_from(["x" * 2_000_000, ["a@example.com"] * 20_000, [{"to": 1}] * 20_000]) | (
    st.integers(min_value=1, max_value=200).map(_nest)
)
values = st.one_of(nested, huge)


@st.composite
def calls(draw: st.DrawFn, name: str) -> tuple[str, list[Any], dict[str, Any]]:
    """One call of `name`: junk positional args, its own keywords with junk, or unknown keywords."""
    known = TASKS[name]
    args = draw(st.lists(values, max_size=3)) if draw(st.booleans()) else []
    keywords = st.sampled_from(known) if known else st.nothing()
    kwargs = draw(st.dictionaries(keywords, values, max_size=3)) if known else {}
    if draw(st.integers(0, 4)) == 0:
        kwargs[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in known))] = draw(values)
    if args and kwargs:  # positional and keyword for the same slot is its own TypeError; keep both kinds
        kwargs = {k: v for k, v in kwargs.items() if k not in known[: len(args)]}
    if name == CANARY and _long_hold(args[0] if args else kwargs.get("hold")):
        return name, [], {}  # a hold of up to a minute is the canary's job, not a fault: keep the run short
    return name, args, kwargs


def _long_hold(hold: Any) -> bool:
    return isinstance(hold, int | float) and not (hold <= 0.5)  # NaN counts as long: sleep(NaN) is not run


batches = st.tuples(
    *[st.lists(calls(name), min_size=CALLS_PER_TASK, max_size=CALLS_PER_TASK) for name in TASKS]
)


def _clear(result: Any) -> bool:
    """A PermanentError, or a TypeError about the task's arguments, with a message."""
    exc = result.result
    if isinstance(exc, PermanentError):
        return bool(str(exc))
    return isinstance(exc, TypeError) and "argument" in str(exc)


def _describe(call: tuple[str, list[Any], dict[str, Any]], result: Any) -> str:
    name, args, kwargs = call
    shown = repr((args, kwargs))
    return (
        f"{name}{shown[:300]} -> {result.state}: {type(result.result).__name__}: {str(result.result)[:300]}"
    )


@pytest.fixture
def fleet(start_worker: Any, smtp_server: Any) -> list[Any]:
    """Workers of every queue, in the Procfile's layout (prefork for files)."""
    return [
        start_worker("email,email_bulk", concurrency=8, env=smtp_env(smtp_server)),
        start_worker("files", pool="prefork", concurrency=2),
        start_worker("default", pool="solo", concurrency=1),
    ]


def test_fuzzed_arguments_end_in_success_or_a_clear_permanent_failure(
    fleet: list[Any], celery_app: Any, redis_client: Any
) -> None:
    store = DeadLetterStore(redis_client)
    totals = {"sent": 0, "done": 0, "lost": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure lists every unclear call
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
        database=None,
    )
    @given(batch=batches)
    def run(batch: Any) -> None:
        sent = [(c, celery_app.send_task(c[0], args=c[1], kwargs=c[2])) for group in batch for c in group]
        totals["sent"] += len(sent)
        try:
            wait_for(
                lambda: all(r.ready() for _, r in sent), timeout=FINISH_WITHIN, interval=0.2, what="calls"
            )
        except TimeoutError:
            stuck = [_describe(c, r) for c, r in sent if not r.ready()]
            print("not finished:", *stuck, sep="\n")
            totals["lost"] += len(stuck)
            raise AssertionError(f"{len(stuck)} calls not finished: {stuck[:5]}") from None
        totals["done"] += len(sent)
        unclear = [_describe(c, r) for c, r in sent if not (r.successful() or (r.failed() and _clear(r)))]
        assert not unclear, "\n".join(unclear)
        failed = [(c, r) for c, r in sent if r.failed() and c[0] not in REPLACED]
        # Celery stores the FAILURE before it sends task_failure: the letter can trail the result.
        wait_for(
            lambda: all(store.get(r.id) for _, r in failed), timeout=10, what="a dead letter per failure"
        )
        for worker in fleet:
            assert worker.proc.poll() is None, worker.log()[-3000:]

    run()

    names = [w.nodename for w in fleet]
    assert len(celery_app.control.ping(destination=names, timeout=5)) == len(fleet)
    for queue in ("email", "email_bulk", "files", "default"):
        assert celery_app.send_task("tasks.health.canary", queue=queue).get(timeout=30)["queue"] == queue
    assert not any(redis_client.llen(q) for q in ("email", "email_bulk", "files", "default"))
    report(Outcome("fuzz", sent=totals["sent"], done=totals["done"], lost=totals["lost"], duplicated=0))
