"""Contract: the web's hand-built task messages (protocol.task_message) are what Celery itself sends.

The web publishes Celery protocol-2 messages without a Celery client. Both messages go through a
real kombu transport (in memory) from the worker's own app: one sent by ``app.send_task``, one built
by protocol.py and published like the web does. A Celery upgrade that changes the message format
fails here instead of silently breaking the web -> worker path.
"""

from __future__ import annotations

import uuid

import pytest
from celery.worker.request import Request
from kombu import Connection
from modelserve.protocol import TASK_MODEL_INFO, TASK_PREDICT, task_message, task_producer, task_queue
from modelserve.wire import pack_rows
from modelserve.worker import create_celery_app
from ms_support import make_settings

ROWS = [[6, 148, 72, 35, 0, 33.6, 0.627, 50], [1, 85, 66, 29, 0, 26.6, 0.351, 31]]
# Values that differ by design: who sent it (Celery: its node name; we: pid@host) and the
# human-readable args (Celery: repr of the args; we: a short placeholder, rows can be megabytes).
OWN_VALUES = {"origin", "argsrepr"}


def _receive(conn: Connection, queue_name: str):
    message = task_queue(queue_name)(conn.default_channel).get(no_ack=True)
    assert message is not None, f"nothing arrived on {queue_name}"
    return message


@pytest.fixture
def celery_app():
    queue = f"contract.{uuid.uuid4().hex[:8]}"
    # The in-memory transport knows neither queue types nor headers exchanges (the dead-letter
    # queue's): the messages are the same whatever the queue type.
    settings = make_settings(
        MODELSERVE_BROKER_URL="memory://", MODELSERVE_TASK_QUEUE=queue, MODELSERVE_TASK_QUEUE_TYPE="classic"
    )
    return create_celery_app(settings)


@pytest.mark.parametrize(("name", "args"), [(TASK_PREDICT, [pack_rows(ROWS)]), (TASK_MODEL_INFO, [])])
def test_hand_built_message_equals_what_celery_sends(celery_app, name, args):
    queue_name = celery_app.conf.task_default_queue
    task_id = uuid.uuid4().hex
    with celery_app.connection_for_write() as conn:
        task_queue(queue_name)(conn.default_channel).declare()
        with celery_app.producer_or_acquire() as producer:
            # The call the web stands in for: it wants the result, on its own reply queue.
            celery_app.send_task(
                name, args=args, task_id=task_id, reply_to="replies", ignore_result=False, producer=producer
            )
        theirs = _receive(conn, queue_name)

        message = task_message(name, args, reply_to="replies", task_id=task_id)
        message.publish(task_producer(conn.default_channel, queue_name), queue_name, ttl=60)  # as the web
        ours = _receive(conn, queue_name)

    assert set(ours.headers) == set(theirs.headers)  # no header missing, none Celery does not know
    for key in OWN_VALUES:
        assert isinstance(ours.headers[key], str) and ours.headers[key]
    assert {k: v for k, v in ours.headers.items() if k not in OWN_VALUES} == {
        k: v for k, v in theirs.headers.items() if k not in OWN_VALUES
    }
    for key in ("correlation_id", "reply_to"):
        assert ours.properties[key] == theirs.properties[key]
    assert (ours.content_type, ours.content_encoding) == (theirs.content_type, theirs.content_encoding)
    assert ours.decode() == theirs.decode()

    # And a Celery worker reads ours as the same request.
    request = Request(ours, app=celery_app, task=celery_app.tasks[name])
    assert (request.id, request.task_name, request.reply_to) == (task_id, name, "replies")
    assert request.correlation_id == task_id
    assert list(request.args) == args and request.kwargs == {}
