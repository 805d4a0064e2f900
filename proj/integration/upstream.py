"""The upstream versions proj's layer was written and tested against, and the internals it touches.

An upgrade of any of these packages past the minor version below can change what the layer relies
on. tests/unit/test_upstream_pins.py fails then, naming the internals to re-check here; each is
explained in docs/internals.md, whose upgrade checklist says how to re-check them.
"""

from __future__ import annotations

# distribution -> the minor version pinned in pyproject.toml
TESTED_WITH = {"celery": "5.7", "kombu": "5.7", "redis": "8.1", "flower": "2.2"}

# distribution -> "module:Class.attribute" names the layer overrides, calls or reads, private or not
# documented as an extension point. Each must still exist after an upgrade.
# Step names in `requires` are strings Celery resolves at start; they count too. Attributes set only
# on instances cannot be looked up here and are re-checked by hand on an upgrade: kombu's
# Channel._queue_cycle, connection_errors, brpop_timeout and virtual Message._raw; Celery's
# Consumer.task_consumer and initial_prefetch_count (the watchdog), the result consumer's
# _pending_results, _pending_messages, _pending_unsubscribe and subscribed_to, and
# EventDispatcher.on_send_buffered and buffer_limit (docs/internals.md).
TOUCHED = {
    "kombu": [
        "kombu.transport.redis:Channel._brpop_start",
        "kombu.transport.redis:SentinelChannel.from_transport_options",
        "kombu.transport:TRANSPORT_ALIASES",
        "kombu.transport.redis:SentinelTransport",
        "kombu.transport.redis:Channel._brpop_read",
        "kombu.transport.redis:Channel._create_client",
        "kombu.transport.redis:Channel._put",
        "kombu.transport.redis:Channel._put_fanout",
        "kombu.transport.redis:Channel._get_publish_topics",
        "kombu.transport.redis:Channel._do_restore_message",
        "kombu.transport.redis:Channel._q_for_pri",
        "kombu.transport.redis:Channel._flush_brpop_reauth",
        "kombu.transport.redis:Channel._in_poll",
        "kombu.transport.redis:Channel._brpop_sent_at",
        "kombu.transport.redis:Channel.sep",
        "kombu.transport.redis:Channel.from_transport_options",
        "kombu.transport.redis:Channel.conn_or_acquire",
        "kombu.transport.redis:Channel.basic_consume",
        "kombu.transport.redis:Channel._queue_bind",
        "kombu.transport.redis:Channel.close",
        "kombu.transport.redis:QoS.append",
        "kombu.transport.redis:QoS.ack",
        "kombu.transport.redis:QoS.reject",
        "kombu.transport.redis:QoS.restore_unacked",
        "kombu.transport.redis:QoS.restore_visible",
        "kombu.transport.redis:QoS.unacked_key",
        "kombu.transport.redis:QoS.unacked_index_key",
        "kombu.transport.redis:QoS.restore_by_tag",
        "kombu.transport.redis:QoS._remove_from_indices",
        "kombu.transport.virtual:QoS.append",
        "kombu.transport.virtual:QoS.ack",
        "kombu.transport.virtual:QoS._delivered",
        "kombu.transport.virtual:Channel._get_message_priority",
        "kombu.transport.virtual:Transport._deliver",
        "kombu.messaging:Producer.publish",
        "kombu.messaging:Producer.batch",
        "kombu.connection:Connection.info",
    ],
    "celery": [
        # Its cancelling of scheduled (countdown) requests is what a lost lease's reconnect relies on.
        "celery.worker.consumer.consumer:Consumer.on_close",
        "celery.backends.redis:SentinelBackend",
        "celery.backends.redis:ResultConsumer._wait_for_pending",
        "celery.backends.redis:ResultConsumer._consume_from",
        "celery.backends.redis:ResultConsumer.on_state_change",
        "celery.backends.redis:ResultConsumer.on_wait_for_pending",
        "celery.backends.redis:RedisBackend.get_key_for_task",
        "celery.backends.redis:ResultConsumer._maybe_cancel_ready_task",
        "celery.backends.redis:ResultConsumer.drain_events_until",
        "celery.backends.asynchronous:_waiting_on",
        "celery.backends.redis:RedisBackend._store_result",
        "celery.backends.redis:RedisBackend._get_result_meta",
        "celery.backends.redis:RedisBackend._MAX_STR_VALUE_SIZE",
        "celery.backends.redis:RedisBackend.on_task_call",
        "celery.backends.redis:RedisBackend.exception_safe_to_retry",
        "celery.app.amqp:AMQP.producer_pool",
        "celery.app.amqp:AMQP.Producer",
        "celery.app.amqp:AMQP.argsrepr_maxsize",
        "celery.worker.consumer.consumer:Consumer._flush_events",
        "celery.events.dispatcher:EventDispatcher.flush",
        "celery.loaders.base:BaseLoader.override_backends",
        "celery.app.task:Task.shadow_name",
        "celery.app.task:Task.retry",
        "celery.app.task:Task.signature_from_request",
        "celery.worker.state:should_stop",
        "celery.worker.state:maybe_shutdown",
        "celery.worker.state:reserved_requests",
        "celery.worker.consumer.consumer:Consumer.on_decode_error",
        "celery.worker.consumer.tasks:Tasks.start",
        "celery.worker.components:Pool",
        "celery.worker.components:Timer",
        "celery.worker.consumer.events:Events",
        # dead_letter_mover.py: the consumer's event-loop timer, and the queues a worker consumes
        "celery.worker.consumer.consumer:Consumer.timer",
        "celery.app.amqp:Queues.consume_from",
        # pipeline.py: an outcome stored under another task's id; a chord member's error as the cause
        "celery.app.task:Context",
        "celery.backends.base:Backend.mark_as_done",
        "celery.backends.base:Backend.mark_as_failure",
        "celery.backends.base:Backend.chord_error_from_stack",
        "celery.backends.base:_create_chord_error_with_cause",
    ],
    "redis": [
        "redis.connection:AbstractConnection.send_packed_command",
        "redis.connection:AbstractConnection.pack_commands",
        "redis.connection:AbstractConnection.read_response",
        "redis.connection:AbstractConnection.can_read",
        "redis.client:Redis.parse_response",
        "redis.connection:ConnectionPool.connection_kwargs",
        "redis.exceptions:OutOfMemoryError",
        "redis.exceptions:ReadOnlyError",
        "redis.exceptions:MasterDownError",
        "redis.exceptions:BusyLoadingError",
    ],
    "flower": [
        "flower.views.monitor:Metrics.get",
        "flower.app:Flower.broker_uri",
        "flower.app:Flower.broker_uri_with_password",
        "flower.utils.broker:Redis",
        "flower.command:flower",
        "flower.command:apply_env_options",
        "flower.command:is_flower_option",
        "flower.options:options.conf",
        "flower.options:options.auth",
        "flower.options:options.basic_auth",
        "flower.options:options.broker_api",
    ],
}
