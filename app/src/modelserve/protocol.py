"""What the web tier and the workers agree on: queue, task names, and the Celery message format.

The web publishes Celery protocol-2 task messages itself (kombu, no Celery client state), with
``reply_to`` set to a private exclusive reply queue; the worker's ``rpc://`` result backend
publishes the result there with ``correlation_id`` = task id.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from array import array
from itertools import chain
from typing import Any

from kombu import Exchange, Queue

TASK_PREDICT = "modelserve.predict"
TASK_PREDICT_NAIVE = "modelserve.predict_naive"
TASK_MODEL_INFO = "modelserve.model_info"


def task_exchange(queue_name: str) -> Exchange:
    return Exchange(queue_name, type="direct", durable=True)


def task_queue(queue_name: str) -> Queue:
    return Queue(queue_name, task_exchange(queue_name), routing_key=queue_name, durable=True)


_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def task_message(
    name: str, args: list[Any], *, reply_to: str, task_id: str | None = None
) -> tuple[str, dict[str, Any], dict[str, Any], list[Any]]:
    """Return (task_id, headers, properties, body) of a Celery protocol-2 message."""
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
    return task_id, headers, properties, body


# Rows and probabilities travel as base64 float32 (what the model consumes anyway): encoding a
# 500-row batch this way is ~20x cheaper than JSON numbers on both sides of the queue.


def pack_floats(values: Any) -> str:
    return base64.b64encode(array("f", values).tobytes()).decode("ascii")


def pack_rows(rows: list[list[float]]) -> str:
    return pack_floats(chain.from_iterable(rows))


def unpack_floats(text: str) -> list[float]:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError("packed float32 data has a length that is not a multiple of 4")
    values = array("f")
    values.frombytes(raw)
    return values.tolist()
