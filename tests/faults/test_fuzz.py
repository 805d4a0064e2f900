"""Fuzzing every public task through real workers: each call ends SUCCESS or a clear FAILURE.

hypothesis draws arguments (wrong types, unknown keywords, huge and deeply nested values, control
characters, NaN, and values that fit the argument so calls get past the type checks) and sends them
with `send_task`, which skips the client-side signature check, to real workers of every queue.
"Clear" means one of:

- a PermanentError subclass (proj.errors) with a non-empty message, never retried;
- a TypeError from calling the task with arguments its signature does not take: Python's own
  message, which names the task and the argument ("canary() got an unexpected keyword argument").

Every call must finish within the bound (nothing left PENDING, STARTED or RETRY), every FAILURE must
have a dead letter that records no retry, and the workers must still be alive and answer a ping
afterwards. Explicit calls over each size limit come first: refused permanently, quickly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proj.errors import PermanentError
from proj.stores.deadletters import DeadLetterStore
from tests import filefactory as ff
from tests.conftest import smtp_env
from tests.faults.scenario import Outcome, report
from tests.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(170)]

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
# A failed step of a pipeline fails the pipeline's id too; the dead letter is the step's own.
PIPELINES = {"tasks.files.process_upload"}
# How many leading arguments a task cannot do without.
REQUIRED = {
    "tasks.email.send_bulk": 2,
    **{f"tasks.files.{n}": 1 for n in ("inspect_file", "make_thumbnails", "extract_archive")},
    **{f"tasks.files.{n}": 1 for n in ("import_csv", "compress", "process_upload")},
}
CANARY = "tasks.health.canary"
CLEANER = "tasks.files.clean_temp_files"
CALLS_PER_TASK = 4
# 6 examples of 4 calls: 24 calls per public task, 240 in all, about 30 s on two busy cores.
EXAMPLES = 6
FINISH_WITHIN = 45.0
# What the workers find under FILES_ROOT, so file tasks get past "no file at key" too.
FILES = ("report.csv", "photo.jpg", "bundle.zip", "notes.txt")
ADDRESSES = ("a@example.com", "b@example.org", "c@mail.example.net")
CONTEXT = {"name": "Ann", "product": "Proj", "url": "https://example.com"}

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

# Values that fit an argument (or nearly): the calls reach the checks behind the type checks, and
# some succeed. Recipient lists stay at a few hundred: a longer one is refused by a limit (the
# explicit calls check that), and a list that long of real recipients is a real send, not a fault.
addresses = st.sampled_from(ADDRESSES) | texts
address_lists = addresses | st.lists(addresses, max_size=5)
contexts = st.fixed_dictionaries({}, optional=dict.fromkeys(CONTEXT, texts)) | st.just(CONTEXT)
recipient = st.fixed_dictionaries({"to": address_lists}, optional={"context": contexts})
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "to": address_lists,
    "cc": address_lists,
    "bcc": address_lists,
    "reply_to": address_lists,
    "subject": texts,
    "text": texts,
    "html": texts,
    "headers": st.dictionaries(
        st.sampled_from(["X-Tag", "List-Id", "Bcc", "X-A\r\nB"]) | texts, texts, max_size=3
    ),
    "attachments": st.lists(st.sampled_from(FILES) | texts, max_size=3),
    "template": st.sampled_from(["welcome", "nope", "../welcome"]),
    "context": contexts,
    "idempotency_key": texts,
    "recipients": st.lists(recipient | nested, max_size=300),
    "key": st.sampled_from(FILES) | texts,
    "sizes": st.lists(st.lists(st.integers(-1, 5000), min_size=2, max_size=2), max_size=4),
    "format": st.sampled_from(["gzip", "zstd", "rar"]),
    "max_age": st.integers(3600, 10**9),
    "notify": addresses,
    "hold": st.floats(0, 0.5),
}


def argument(name: str) -> st.SearchStrategy[Any]:
    """Junk of any type or size once in three, else a value that fits `name`."""
    return st.integers(0, 2).flatmap(lambda n: values if n == 0 else PLAUSIBLE[name])


@st.composite
def calls(draw: st.DrawFn, name: str) -> tuple[str, list[Any], dict[str, Any]]:
    """One call of `name`: positional and keyword arguments, sometimes one too many or unknown."""
    known, required = TASKS[name], REQUIRED.get(name, 0)
    # Once in eight, one more than the signature takes: Python's TypeError.
    count = len(known) + 1 if draw(st.integers(0, 7)) == 0 else draw(st.integers(0, len(known)))
    args = [draw(argument(n) if n else values) for n in (*known, "")[:count]]
    # Each argument left is given as a keyword, a required one nearly always.
    odds = [7 if i < required else 1 for i in range(len(known))]
    names = [n for i, n in enumerate(known) if i >= count and draw(st.integers(0, odds[i])) > 0]
    kwargs = {n: draw(argument(n)) for n in names}
    if draw(st.integers(0, 7)) == 0:
        kwargs[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in known))] = draw(values)
    first = args[0] if args else kwargs.get(known[0])
    if name == CANARY and _number(first) and not first <= 0.5:  # NaN too: sleep(NaN) is never run
        return name, [], {}  # a hold of up to a minute is the canary's job, not a fault: keep the run short
    if name == CLEANER and _number(first) and not first >= 3600:
        # Removing the temp files of tasks still writing them is what a max_age under an hour asks.
        return name, [], {}
    return name, args, kwargs


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


batches = st.tuples(
    *[st.lists(calls(name), min_size=CALLS_PER_TASK, max_size=CALLS_PER_TASK) for name in TASKS]
)

# Over each limit, once each: a PermanentError naming it (and the call that froze the email worker).
OVERSIZED = [
    (
        "tasks.email.send_bulk",
        ["welcome", [{"to": f"r{i}@example.com", "context": CONTEXT} for i in range(10_001)]],
        "10001, over the limit of 10000",
    ),
    ("tasks.email.send_email", ["a@example.com", "s", "x" * 1_000_001], "over the limit of 1000000"),
    ("tasks.email.send_email", [[f"r{i}@example.com" for i in range(101)], "s", "t"], "at most 100"),
    ("tasks.email.send_email", ["x" * 2_000_000, "s", "t"], "at most 254"),
    ("tasks.files.compress", ["notes.txt", "x" * 2_000_000], "unknown compression format"),
    ("tasks.files.make_thumbnails", ["photo.jpg", [[8, 8]] * 21], "at most 20"),
]


def _clear(name: str, result: Any) -> bool:
    """A PermanentError, or Python's TypeError about the task's own signature, with a message."""
    exc = result.result
    if isinstance(exc, PermanentError):
        return bool(str(exc))
    function = name.rsplit(".", 1)[-1]
    return isinstance(exc, TypeError) and str(exc).startswith(f"{function}() ") and "argument" in str(exc)


def _describe(call: tuple[str, list[Any], dict[str, Any]], result: Any) -> str:
    name, args, kwargs = call
    shown = repr((args, kwargs))
    return (
        f"{name}{shown[:300]} -> {result.state}: {type(result.result).__name__}: {str(result.result)[:300]}"
    )


@pytest.fixture
def fleet(start_worker: Any, smtp_server: Any, files_root: Path) -> list[Any]:
    """Workers of every queue, in the Procfile's layout (prefork for files), and files to work on."""
    ff.sample_csv(files_root / "report.csv")
    ff.photo(files_root / "photo.jpg")
    ff.zip_of(files_root / "bundle.zip", {"a.txt": b"alpha\n", "b/c.csv": b"x,y\n1,2\n"})
    (files_root / "notes.txt").write_text("plain notes\n")
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

    def settle(sent: list[tuple[tuple[str, list[Any], dict[str, Any]], Any]]) -> None:
        """Wait for every call; check each is clear, each failure has a letter, every worker lives."""
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
        unclear = [
            _describe(c, r) for c, r in sent if not (r.successful() or (r.failed() and _clear(c[0], r)))
        ]
        assert not unclear, "\n".join(unclear)
        failed = [(c, r) for c, r in sent if r.failed() and c[0] not in PIPELINES]
        # Celery stores the FAILURE before it sends task_failure: the letter can trail the result.
        wait_for(
            lambda: all(store.get(r.id) for _, r in failed), timeout=10, what="a dead letter per failure"
        )
        retried = [_describe(c, r) for c, r in failed if store.get(r.id).retries]
        assert not retried, "bad arguments must fail at once, not after retries:\n" + "\n".join(retried)
        for worker in fleet:
            assert worker.proc.poll() is None, worker.log()[-3000:]

    explicit = [((name, args, {}), celery_app.send_task(name, args=args)) for name, args, _ in OVERSIZED]
    settle(explicit)
    for (name, _, reason), (_, result) in zip(OVERSIZED, explicit, strict=True):
        error = result.result
        assert isinstance(error, PermanentError) and reason in str(error), (name, error)
        assert len(str(error)) < 1000, name

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
        settle([(c, celery_app.send_task(c[0], args=c[1], kwargs=c[2])) for group in batch for c in group])

    run()

    names = [w.nodename for w in fleet]
    assert len(celery_app.control.ping(destination=names, timeout=5)) == len(fleet)
    for queue in ("email", "email_bulk", "files", "default"):
        assert celery_app.send_task("tasks.health.canary", queue=queue).get(timeout=30)["queue"] == queue
    assert not any(redis_client.llen(q) for q in ("email", "email_bulk", "files", "default"))
    report(Outcome("fuzz", sent=totals["sent"], done=totals["done"], lost=totals["lost"], duplicated=0))
