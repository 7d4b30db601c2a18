"""What the web tier and the workers agree on: queue, task names, and the Celery message format.

The web publishes Celery protocol-2 task messages itself (kombu, no Celery client state), with
``reply_to`` set to a private exclusive reply queue; the worker's ``rpc://`` result backend
publishes the result there with ``correlation_id`` = task id. ``tests/test_celery_contract.py``
checks these messages against what Celery itself sends. What the task arguments and answers hold
is :mod:`modelserve.wire`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from typing import Any, NamedTuple

from kombu import Exchange, Producer, Queue, binding

log = logging.getLogger(__name__)

TASK_PREDICT = "modelserve.predict"
TASK_MODEL_INFO = "modelserve.model_info"
# What a full dead-letter queue drops first: its oldest message (it is a sample, not a backlog).
DEAD_LETTER_MAX_LENGTH = 10_000
# Why RabbitMQ dead-letters a task message that is parked: delivered more than the delivery limit
# (requeued by failing workers), or rejected without requeue (e.g. Celery, after a worker died
# twice on it). An expired task (nobody consumed it within its TTL) is dropped, as before: nobody
# waits for its answer and it says nothing about the message.
DEAD_LETTER_REASONS = ("delivery_limit", "rejected")


def task_exchange(queue_name: str) -> Exchange:
    return Exchange(queue_name, type="direct", durable=True)


class TaskQueue(Queue):
    """A kombu Queue that declares its dead-letter queue first, wherever it is declared (web, workers).

    Upgrading from the classic queue of the same name (or changing the delivery limit): RabbitMQ
    refuses to redeclare a queue with other arguments (406 PRECONDITION_FAILED, "inequivalent
    arg"). Then the old queue is deleted once no consumer is left on it (the old workers stopped; it
    only holds tasks younger than their TTL) and the error is raised: the caller's retry (the web's
    next connection, Celery's reconnect) declares the queue anew.
    """

    attrs = (*Queue.attrs, ("dead_letter", None))

    def declare(self, nowait: bool = False, channel: Any = None) -> str:
        channel = channel or self.channel
        if self.dead_letter is not None:
            self.dead_letter.bind(channel).declare(nowait=nowait)
        try:
            return super().declare(nowait=nowait, channel=channel)
        except Exception as exc:
            if getattr(exc, "reply_code", None) == 406 and "inequivalent arg" in str(exc):
                self._delete_unused_queue(channel)
            raise

    def _delete_unused_queue(self, channel: Any) -> None:
        # The 406 closed the channel: a new one on the same connection.
        with contextlib.suppress(Exception):
            other = channel.connection.channel()
            try:
                other.queue_delete(self.name, if_unused=True)
                log.warning("deleted the unused queue %s (other arguments), to declare it again", self.name)
            finally:
                with contextlib.suppress(Exception):
                    other.close()


def dead_letter_queue(queue_name: str, queue_type: str = "quorum") -> Queue:
    """``<queue>.dead``: where poison task messages are parked and counted (its message count)."""
    exchange = Exchange(f"{queue_name}.dead", type="headers", durable=True)
    # all-with-x: match on the x-first-death-reason header RabbitMQ sets (x- headers are ignored by
    # a plain all/any match).
    bindings = [
        binding(exchange, arguments={"x-match": "all-with-x", "x-first-death-reason": reason})
        for reason in DEAD_LETTER_REASONS
    ]
    arguments = {"x-queue-type": queue_type, "x-max-length": DEAD_LETTER_MAX_LENGTH}
    return Queue(f"{queue_name}.dead", bindings=bindings, durable=True, queue_arguments=arguments)


def task_queue(queue_name: str, queue_type: str = "classic", delivery_limit: int = 5) -> Queue:
    """The task queue. classic: RabbitMQ's default queue, no arguments (one node holds it).

    quorum: replicated on every broker node (Raft); a message returned to the queue more than
    ``delivery_limit`` times (a worker failed on it, or died holding it) is dead-lettered to
    :func:`dead_letter_queue` instead of being redelivered forever.
    """
    if queue_type == "classic":
        return Queue(queue_name, task_exchange(queue_name), routing_key=queue_name, durable=True)
    arguments = {
        "x-queue-type": queue_type,
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": f"{queue_name}.dead",
    }
    return TaskQueue(
        queue_name,
        task_exchange(queue_name),
        routing_key=queue_name,
        durable=True,
        queue_arguments=arguments,
        dead_letter=dead_letter_queue(queue_name, queue_type),
    )


def settings_task_queue(settings: Any) -> Queue:
    """The task queue a :class:`~modelserve.config.Settings` describes (web and workers alike)."""
    return task_queue(settings.task_queue, settings.task_queue_type, settings.task_delivery_limit)


_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def task_producer(channel: Any, queue_name: str) -> Producer:
    """Publishes to the task exchange without declaring it (auto_declare off): the workers declare
    it, and the web's broker user may not."""
    return Producer(channel, exchange=task_exchange(queue_name), serializer="json", auto_declare=False)


class TaskMessage(NamedTuple):
    """A Celery protocol-2 task message."""

    id: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: list[Any]

    def publish(self, producer: Producer, queue_name: str, ttl: float) -> None:
        """Transient, with a TTL: a task nobody consumed in time is dropped by RabbitMQ."""
        producer.publish(
            self.body,
            routing_key=queue_name,
            headers=self.headers,
            delivery_mode=1,
            expiration=ttl,
            retry=False,
            **self.properties,
        )


def task_message(name: str, args: list[Any], *, reply_to: str, task_id: str | None = None) -> TaskMessage:
    """The message ``send_task(name, args, reply_to=reply_to, ignore_result=False)`` would send."""
    task_id = task_id or uuid.uuid4().hex
    headers = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": f"<{name} args>",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties = {"correlation_id": task_id, "reply_to": reply_to}
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return TaskMessage(task_id, headers, properties, body)


# --- worker status: how the front ends know the fleet without Celery remote control -------------
#
# Every worker publishes a small JSON status to a fanout exchange named after the task queue, at
# start, when its model or consuming state changes, and every MODELSERVE_STATUS_INTERVAL seconds;
# each web process binds a private exclusive queue to it and keeps the latest status per worker
# until its ``ttl`` passes. Fields: worker, state (one of STATUS_STATES), consuming, version,
# reason (why there is no model; no paths), ttl (seconds), and the model's info when serving.

STATUS_STATES = ("serving", "no_model", "stopped")


def status_exchange(queue_name: str) -> Exchange:
    return Exchange(f"{queue_name}.status", type="fanout", durable=False, auto_delete=False)


def status_queue(queue_name: str, name: str) -> Queue:
    """A web process's private queue of worker statuses (deleted with its connection).

    The exchange is only checked (passive): the workers declare it; the web's broker user may not
    (least privilege: it declares nothing it shares), so a missing one is a 404 NOT_FOUND.
    """
    exchange = status_exchange(queue_name)
    exchange.passive = True
    return Queue(name, exchange, exclusive=True, auto_delete=True, durable=False)
