"""Messages built by copying one that Celery built: the fast path of `enqueue_many`.

Celery glue (imports celery). The first signature of a kind (same task, same options) goes through
Celery's whole `apply_async`, with a recording producer in place of the real one; the message it
would have published becomes the template. Every other signature of that kind is the template with
the per-message fields replaced (task id, root id, argument reprs, correlation id), and the steps
`apply_async` runs per message run again here: the argument check (`check_arguments`, before any
is published), `before_task_publish` and `after_task_publish` handlers, the `task-sent` event, the
result subscription, the parent's trail.
What depends on more than the task and its options (countdowns, links, canvases, custom
`apply_async` or `shadow_name`) is not copied: `kind_of` answers None and the caller sends it whole.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Signature, Task
from celery.result import AsyncResult
from celery.signals import after_task_publish, before_task_publish, task_sent
from celery.utils.saferepr import saferepr
from kombu.utils.uuid import uuid

# Options whose effect on the message is the same for every signature that carries them.
COPYABLE_OPTIONS = frozenset(
    {
        "queue",
        "routing_key",
        "exchange",
        "priority",
        "ignore_result",
        "time_limit",
        "soft_time_limit",
        "task_id",
    }
)
# Producer.publish's own arguments; Celery passes the rest as message properties.
PUBLISH_ARGUMENTS = frozenset(
    {
        "routing_key",
        "delivery_mode",
        "mandatory",
        "immediate",
        "content_type",
        "content_encoding",
        "serializer",
        "headers",
        "compression",
        "exchange",
        "retry",
        "retry_policy",
        "declare",
        "expiration",
        "timeout",
        "confirm_timeout",
    }
)
# A task class may declare that its apply_async differs from Celery's only for delayed messages
# (which are never copied).
COPYABLE_ATTRIBUTE = "apply_async_copyable"

Kind = tuple[Hashable, ...]


class Recorder:
    """Stands in for the producer while Celery builds a message: keeps it instead of sending it."""

    def __init__(self, producer: Any) -> None:
        self.connection = producer.connection
        self.published: tuple[Any, dict[str, Any]] | None = None

    def publish(self, body: Any, **options: Any) -> None:
        """Keep the body and the publish options."""
        self.published = (body, options)


@dataclass(frozen=True)
class Template:
    """One message as Celery built it, and what varies from one copy to the next."""

    task: Task  # type: ignore[type-arg]
    body: Any
    publish: dict[str, Any]  # Producer.publish keyword arguments, headers and properties included
    sent_event: dict[str, Any] | None
    root_is_id: bool  # no parent task: each message is its own root
    ignore_result: bool
    repr_limits: tuple[int, int, int]  # argsrepr size, kwargsrepr size, nesting levels

    def copy(self, sig: Signature[Any], app: Celery, producer: Any) -> tuple[AsyncResult[Any], Any]:
        """This template with `sig`'s id and arguments: its result and the sent event's fields."""
        args, kwargs = tuple(sig.args or ()), dict(sig.kwargs or {})
        task_id = sig.options.get("task_id") or uuid()
        options = dict(self.publish)
        headers = options["headers"] = dict(options["headers"])
        args_size, kwargs_size, levels = self.repr_limits
        headers.update(
            id=task_id,
            argsrepr=saferepr(args, args_size, maxlevels=levels) if args else "()",
            kwargsrepr=saferepr(kwargs, kwargs_size, maxlevels=levels) if kwargs else "{}",
        )
        if self.root_is_id:
            headers["root_id"] = task_id
        options["correlation_id"] = task_id
        body = (args, kwargs, self.body[2])
        if not self.ignore_result:
            app.backend.on_task_call(producer, task_id)
        _send_before_publish(self.task.name, body, options)
        producer.publish(body, **options)
        if after_task_publish.receivers:
            after_task_publish.send(
                sender=self.task.name,
                body=body,
                headers=headers,
                exchange=options["exchange"],
                routing_key=options["routing_key"],
            )
        result = self.task.AsyncResult(task_id)
        result.ignored = self.ignore_result
        return result, self._event(headers)

    def _event(self, headers: dict[str, Any]) -> dict[str, Any] | None:
        """The template's `task-sent` fields for this copy."""
        if self.sent_event is None:
            return None
        return dict(
            self.sent_event,
            uuid=headers["id"],
            root_id=headers["root_id"],
            args=headers["argsrepr"],
            kwargs=headers["kwargsrepr"],
        )


def kind_of(sig: Signature[Any], app: Celery) -> Kind | None:
    """What makes `sig`'s message a copy of another's, or None when it must be built whole."""
    if type(sig) is not Signature or sig.get("subtask_type") or task_sent.receivers:
        return None
    if not COPYABLE_OPTIONS.issuperset(sig.options):
        return None
    task = app.tasks.get(str(sig.task))
    if task is None or not _copyable_class(task):
        return None
    kind = (str(sig.task), *sorted((k, v) for k, v in sig.options.items() if k != "task_id"))
    try:
        hash(kind)
    except TypeError:  # an option given as an object (a kombu Queue, say): build it whole
        return None
    return kind


def record(sig: Signature[Any], app: Celery, producer: Any, sent: Any) -> tuple[AsyncResult[Any], Template]:
    """Send `sig` through Celery's own apply_async, publishing what it built; its template."""
    recorder = Recorder(producer)
    result = sig.apply_async(producer=recorder, retry=False, event_dispatcher=sent)  # type: ignore[arg-type]
    if recorder.published is None:
        raise RuntimeError(f"apply_async of {sig.task} published no message")
    body, options = recorder.published
    producer.publish(body, **options)
    headers = options["headers"]
    task = app.tasks[str(sig.task)]
    amqp = app.amqp
    template = Template(
        task=task,
        body=body,
        publish=dict(options, declare=()),  # the recorded publish declared the queue
        sent_event=sent.last_for(headers["id"]),
        root_is_id=headers["root_id"] == headers["id"] and headers.get("parent_id") is None,
        ignore_result=bool(headers.get("ignore_result")),
        repr_limits=(amqp.argsrepr_maxsize, amqp.kwargsrepr_maxsize, app.conf.task_repr_maxlevels),
    )
    return result, template


def _copyable_class(task: Task) -> bool:  # type: ignore[type-arg]
    """Whether every message of this task depends only on its id, arguments and options."""
    cls = type(task)
    own_apply = cls.apply_async is Task.apply_async or bool(getattr(cls, COPYABLE_ATTRIBUTE, False))
    plain_shadow = cls.shadow_name is Task.shadow_name
    return own_apply and plain_shadow and getattr(task, "_dump_pydantic_arguments", None) is None


def check_arguments(sig: Signature[Any], app: Celery) -> None:
    """Raise TypeError, as apply_async would, when `sig`'s arguments do not fit its task."""
    task = app.tasks.get(str(sig.task))
    check: Callable[..., Any] | None = getattr(task, "__header__", None) if task and task.typing else None
    if check is not None and type(sig) is Signature:
        check(*(sig.args or ()), **(sig.kwargs or {}))


def _send_before_publish(name: str, body: Any, options: dict[str, Any]) -> None:
    """`before_task_publish` with the arguments Celery gives it (proj stamps the send time there)."""
    if not before_task_publish.receivers:
        return
    properties = {k: v for k, v in options.items() if k not in PUBLISH_ARGUMENTS}
    before_task_publish.send(
        sender=name,
        body=body,
        exchange=options["exchange"],
        routing_key=options["routing_key"],
        declare=options["declare"],
        headers=options["headers"],
        properties=properties,
        retry_policy=options.get("retry_policy"),
    )
