"""What the web tier and the workers agree on: queue, task names, and the Celery message format.

The web publishes Celery protocol-2 task messages itself (kombu, no Celery client state), with
``reply_to`` set to a private exclusive reply queue; the worker's ``rpc://`` result backend
publishes the result there with ``correlation_id`` = task id. ``tests/test_celery_contract.py``
checks these messages against what Celery itself sends. What the task arguments and answers hold
is :mod:`modelserve.wire`.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, NamedTuple

from kombu import Exchange, Producer, Queue

TASK_PREDICT = "modelserve.predict"
TASK_MODEL_INFO = "modelserve.model_info"


def task_exchange(queue_name: str) -> Exchange:
    return Exchange(queue_name, type="direct", durable=True)


def task_queue(queue_name: str) -> Queue:
    return Queue(queue_name, task_exchange(queue_name), routing_key=queue_name, durable=True)


_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def task_producer(channel: Any, queue_name: str) -> Producer:
    return Producer(channel, exchange=task_exchange(queue_name), serializer="json")


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
    """A web process's private queue of worker statuses (deleted with its connection)."""
    return Queue(name, status_exchange(queue_name), exclusive=True, auto_delete=True, durable=False)
