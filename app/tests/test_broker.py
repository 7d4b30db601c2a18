"""The task queue on a REAL RabbitMQ: quorum type, delivery limit and dead-letter queue, failover
over several broker URLs, heartbeats on the web's connections."""

from __future__ import annotations

import re
import secrets
import time

import amqp
import ms_devstack as devstack
import pytest
import requests
from kombu import Connection
from modelserve.config import load_settings
from modelserve.protocol import (
    dead_letter_queue,
    settings_task_queue,
    task_message,
    task_producer,
    task_queue,
)
from ms_poison import POISON
from ms_support import requires_rabbitmq
from test_metrics import scrape, value

pytestmark = [pytest.mark.integration, requires_rabbitmq]

ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]


def queue_types(rabbitmq) -> dict[str, str]:
    out = rabbitmq.ctl("--quiet", "list_queues", "-p", rabbitmq.vhost, "name", "type", "--no-table-headers")
    return dict(line.split("\t") for line in out.splitlines() if line.strip())


def wait_for_message(conn: Connection, queue, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = queue(conn.default_channel).get(no_ack=True)
        if message is not None:
            return message
        time.sleep(0.2)
    return None


def predictions_flow_again(stack, url: str, timeout: float = 30) -> None:
    """Asks for a prediction until one is answered 200, for up to `timeout` seconds."""
    deadline, codes = time.monotonic() + timeout, []
    while time.monotonic() < deadline and codes[-1:] != [200]:
        codes.append(requests.post(url, json={"row": ROW}, timeout=30).status_code)
    assert codes[-1:] == [200], (codes, stack.logs())


def test_the_task_queue_is_a_quorum_queue_with_a_dead_letter_queue(make_stack, rabbitmq):
    stack = make_stack(workers=1)
    stack.wait_ready()
    assert requests.post(f"{stack.url}/api/v1/predict", json={"row": ROW}, timeout=15).status_code == 200
    name = stack.env["MODELSERVE_TASK_QUEUE"]
    types = queue_types(rabbitmq)
    assert types[name] == "quorum"
    assert types[f"{name}.dead"] == "quorum"
    # Celery's native delayed delivery (28 unused quorum queues) is left out, and with remote control
    # off the worker has no pidbox queue anyone could send `celery control` commands to.
    assert not [q for q in types if q.startswith("celery_delayed")], types
    assert not [q for q in types if q.endswith(".celery.pidbox")], types


def test_remote_control_is_there_only_when_asked(make_stack, rabbitmq):
    # The worker user with the role's remote-control permissions (rabbitmq_celery_remote_control).
    make_stack(
        workers=1,
        web=False,
        broker_urls=rabbitmq.urls(worker="worker_rc"),
        MODELSERVE_WORKER_REMOTE_CONTROL="1",
    )
    deadline = time.monotonic() + 30
    while not [q for q in queue_types(rabbitmq) if q.endswith(".celery.pidbox")]:
        assert time.monotonic() < deadline, "no pidbox queue 30 s after the worker started"
        time.sleep(0.5)


def test_a_poison_message_is_parked_after_the_delivery_limit(make_stack, rabbitmq):
    """A task that always hands its message back is delivered limit + 1 times, then parked."""
    stack = make_stack(workers=0, web=False, MODELSERVE_TASK_DELIVERY_LIMIT="3")
    worker = devstack.start_poison_worker(stack.worker_env, stack.base / "poison-worker.log")
    stack.workers.append(worker)
    settings = load_settings(stack.env)
    with Connection(rabbitmq.admin_url, connect_timeout=5) as conn:
        settings_task_queue(settings)(conn.default_channel).declare()
        poison = task_message(POISON, [], reply_to="")
        unknown = task_message("modelserve.no_such_task", [], reply_to="")
        producer = task_producer(conn.default_channel, settings.task_queue)
        for message in (poison, unknown):
            message.publish(producer, settings.task_queue, ttl=60)

        parked = {}
        dead = dead_letter_queue(settings.task_queue)
        deadline = time.monotonic() + 60
        while len(parked) < 2 and time.monotonic() < deadline:
            message = wait_for_message(conn, dead, timeout=max(0.1, deadline - time.monotonic()))
            if message is not None:
                parked[message.headers["id"]] = message
        assert set(parked) == {poison.id, unknown.id}, stack.logs()
        # The poison task: requeued by its worker until RabbitMQ stopped delivering it.
        death = parked[poison.id].headers
        assert death["x-first-death-reason"] == "delivery_limit"
        assert death["x-first-death-queue"] == settings.task_queue
        # A task no worker knows: Celery rejects it at once (no requeue), parked too.
        assert parked[unknown.id].headers["x-first-death-reason"] == "rejected"
        # Nothing left to redeliver, and the worker saw the poison exactly limit + 1 times.
        time.sleep(1.0)
        assert settings_task_queue(settings)(conn.default_channel).get(no_ack=True) is None
        assert dead(conn.default_channel).get(no_ack=True) is None
    log = (stack.base / "poison-worker.log").read_text(errors="replace")
    assert log.count(f"{POISON}[{poison.id}] reject requeue=True") == 3 + 1, log[-3000:]
    # What the worker saw of it, on its metrics: every hand-back, and the one that got it parked.
    metrics = scrape(worker.metrics_url)
    assert value(metrics, "modelserve_worker_task_rejections_total", task=POISON, requeue="true") == 4
    assert (
        value(metrics, "modelserve_worker_tasks_dead_lettered_total", task=POISON, reason="delivery_limit")
        == 1
    )


def test_clients_fail_over_to_the_next_broker_url(make_stack, rabbitmq):
    port = devstack.free_port()
    urls = {
        c: f"{rabbitmq.url_for(role, port=port)};{rabbitmq.url_for(role)}"
        for c, role in (("web", "web"), ("worker", "worker"))
    }
    # The dead first URL is a closed port: refused at once, whatever the timeout. The timeout also
    # bounds how long a request waits for its process's reply queue, which took over 1 s to come up
    # on a loaded CI machine (a 503 "broker unreachable" there, not a failed failover).
    stack = make_stack(workers=1, broker_urls=urls, MODELSERVE_BROKER_CONNECT_TIMEOUT="5")
    stack.wait_ready(40)
    for _ in range(5):  # both web processes, whichever node each starts with
        r = requests.post(f"{stack.url}/api/v1/predict", json={"row": ROW}, timeout=15)
        assert r.status_code == 200, (r.text, stack.logs())


def test_idle_connections_keep_their_heartbeats(make_stack, rabbitmq):
    """With a 1 s heartbeat the broker drops a connection silent for ~2 s: idle ones must speak."""
    stack = make_stack(workers=1, MODELSERVE_BROKER_HEARTBEAT="1")
    stack.wait_ready()
    url = f"{stack.url}/api/v1/predict"
    assert requests.post(url, json={"row": ROW}, timeout=15).status_code == 200
    time.sleep(5)  # idle: the publishing and reply connections only exchange heartbeats
    with requests.Session() as s:
        assert [s.post(url, json={"row": ROW}, timeout=15).status_code for _ in range(10)] == [200] * 10
    out = rabbitmq.ctl("--quiet", "list_connections", "timeout", "--no-table-headers")
    timeouts = [int(t) for t in out.split()]
    # the web's publishing and reply connections, and the worker's, negotiated 1 s
    assert timeouts.count(1) >= 3, (out, stack.logs())
    assert "broker failed" not in stack.logs() and "lost the broker" not in stack.logs()


def test_a_publishing_channel_that_stops_confirming_is_given_up(make_stack, rabbitmq):
    """A channel that takes publishes but confirms none is given up after the confirm timeout: its
    requests are answered 503 saying so (not after the whole task timeout), and the web publishes
    through a new connection once the broker confirms again. Seen in a partition: a channel opened
    while the task queue's leader was on the cut-off node sent every publish there until the
    partition healed. Here the broker's memory alarm stalls publishing the same way (a blocked
    connection is not read)."""
    stack = make_stack(workers=1, MODELSERVE_BROKER_CONFIRM_TIMEOUT="1", MODELSERVE_TASK_TIMEOUT="20")
    stack.wait_ready(40)
    url = f"{stack.url}/api/v1/predict"
    assert requests.post(url, json={"row": ROW}, timeout=30).status_code == 200
    rabbitmq.ctl("set_vm_memory_high_watermark", "0.000001")  # an alarm at once: publishers blocked
    try:
        r = requests.post(url, json={"row": ROW}, timeout=30)
        assert r.status_code == 503, (r.text, stack.logs())
        # The web's log says why (the client is told the broker is unreachable, to retry): not
        # "no worker answered within 20 s".
        assert "503 (broker): the broker did not confirm the task" in stack.logs(), r.text
    finally:
        rabbitmq.ctl("set_vm_memory_high_watermark", "0.3")  # the devstack's setting
    predictions_flow_again(stack, url)
    assert "no publisher confirm for" in stack.logs()


def test_a_publishing_channel_that_refuses_a_task_is_given_up(make_stack, rabbitmq):
    """A task the broker refuses (nack) is answered 503 at once, and the web publishes the next one
    through a new connection: a channel that asks a cut-off quorum queue leader kept being refused
    after a new leader was elected (a partition). Here a policy makes the queue refuse every
    publish (max-length 0, reject-publish: a classic queue refuses at once, a quorum queue only
    once over its limit), then goes."""
    stack = make_stack(workers=1, MODELSERVE_TASK_TIMEOUT="20", MODELSERVE_TASK_QUEUE_TYPE="classic")
    stack.wait_ready(40)
    url = f"{stack.url}/api/v1/predict"
    assert requests.post(url, json={"row": ROW}, timeout=30).status_code == 200
    queue = stack.env["MODELSERVE_TASK_QUEUE"]
    policy = f"refuse-{queue}"
    rabbitmq.ctl(
        "set_policy", "-p", rabbitmq.vhost, "--apply-to", "queues", "--priority", "100",
        policy, f"^{re.escape(queue)}$", '{"max-length": 0, "overflow": "reject-publish"}',
    )  # fmt: skip
    try:
        deadline, r = time.monotonic() + 20, None
        while time.monotonic() < deadline and "refused the task" not in stack.logs():
            started = time.monotonic()
            r = requests.post(url, json={"row": ROW}, timeout=30)
            assert r.status_code in (200, 503), r.text  # 200 until the policy reaches the queue
        assert r is not None and r.status_code == 503, (r and r.text, stack.logs())
        assert time.monotonic() - started < 10, "answered only after the task timeout"
        assert "the broker refused 1 task(s)" in stack.logs()  # the connection was given up
    finally:
        rabbitmq.ctl("clear_policy", "-p", rabbitmq.vhost, policy)
    predictions_flow_again(stack, url)


def test_an_unused_classic_queue_of_the_same_name_is_replaced(make_stack, rabbitmq):
    """Upgrading: the classic queue of before is deleted once unused, and declared as a quorum queue."""
    name = f"modelserve.test.{secrets.token_hex(4)}"
    with Connection(rabbitmq.admin_url, connect_timeout=5) as conn:
        task_queue(name)(conn.default_channel).declare()  # what the previous version declared
    assert queue_types(rabbitmq)[name] == "classic"
    stack = make_stack(workers=1, MODELSERVE_TASK_QUEUE=name)
    # The first worker deletes it and exits (Celery deems a 406 unrecoverable); systemd's
    # Restart=always starts it again, as the second worker here, and it declares the quorum queue.
    first = stack.workers[0]
    deadline = time.monotonic() + 60
    while first.poll() is None:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.5)
    stack.start_worker()
    stack.wait_ready(60)
    assert requests.post(f"{stack.url}/api/v1/predict", json={"row": ROW}, timeout=15).status_code == 200
    assert queue_types(rabbitmq)[name] == "quorum"


# --- least privilege: each component's broker user, with the rabbitmq role's permissions ---------


def _purge(channel, q):
    channel.queue_purge(q)


def _delete(channel, q):
    channel.queue_delete(q)


def _consume(channel, q):
    channel.basic_consume(q, callback=lambda m: None)


def _get(channel, q):
    channel.basic_get(q)


def _declare(channel, q):
    settings_task_queue(
        load_settings({"MODELSERVE_BROKER_URL": "amqp://u:p@h/v", "MODELSERVE_TASK_QUEUE": q})
    )(channel).declare()


def _siphon(channel, q):
    """A queue of the web's own names, bound to the task exchange: the tasks copied to it."""
    name = f"modelserve.status.thief.{secrets.token_hex(4)}"
    channel.queue_declare(name, exclusive=True, auto_delete=True)
    channel.queue_bind(name, exchange=q, routing_key=q)


def _publish(exchange, routing_key=None):
    def action(channel, q):
        channel.basic_publish(
            amqp.Message(b"{}"), exchange=exchange.format(q=q), routing_key=routing_key or q
        )
        channel.queue_declare(q, passive=True)  # a synchronous call: the refusal arrives before its answer

    return action


def _dead_letters(channel, q):
    channel.basic_get(f"{q}.dead")


@pytest.mark.parametrize(
    ("user", "action"),
    [
        # A compromised front end cannot empty, delete, drain or copy the prediction queue ...
        ("web", _purge),
        ("web", _delete),
        ("web", _consume),
        ("web", _get),
        ("web", _siphon),
        ("web", _dead_letters),
        # ... declare it (or anything shared), answer in a worker's place through amq.default, nor
        # send Celery remote-control commands (none would be listened to anyway: it is off).
        ("web", _declare),
        ("web", _publish("")),
        ("web", _publish("celery.pidbox", "")),
        # A worker cannot send remote-control commands either, nor publish outside its names.
        ("worker", _publish("celery.pidbox", "")),
        ("worker", _publish("amq.topic")),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", "publish"),
)
def test_each_user_is_refused_what_its_component_does_not_do(rabbitmq, user, action):
    """ACCESS_REFUSED from the real broker, with the role's regexes (ms_devstack reads them)."""
    q = f"modelserve.test.{secrets.token_hex(4)}"
    with Connection(rabbitmq.admin_url, connect_timeout=5) as admin:
        _declare(admin.default_channel, q)
        _publish("{q}")(admin.default_channel, q)  # something to purge, get or consume
    with (
        Connection(rabbitmq.url_for(user), connect_timeout=5) as conn,
        pytest.raises(amqp.exceptions.AccessRefused),
    ):
        action(conn.channel(), q)
    # Not a queue that was missing: the task message is still there, for the worker.
    with Connection(rabbitmq.url_for("worker"), connect_timeout=5) as conn:
        assert conn.channel().basic_get(q, no_ack=True) is not None


@pytest.mark.parametrize(
    ("user", "action"),
    [
        ("worker", _declare),
        ("worker", _purge),
        ("worker", _consume),
        ("worker", _get),
        ("worker", _dead_letters),
        ("worker", _publish("")),  # replies, through amq.default
        ("worker", _publish("{q}")),  # retries
        ("web", _publish("{q}")),  # tasks
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", "publish"),
)
def test_each_user_may_do_what_its_component_does(rabbitmq, user, action):
    """The other side of the test above: the same calls, by the user whose job they are, work."""
    q = f"modelserve.test.{secrets.token_hex(4)}"
    with Connection(rabbitmq.admin_url, connect_timeout=5) as admin:
        _declare(admin.default_channel, q)
    with Connection(rabbitmq.url_for(user), connect_timeout=5) as conn:
        action(conn.channel(), q)
