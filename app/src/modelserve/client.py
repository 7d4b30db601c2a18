"""The web tier's path to the workers: a micro-batcher over RabbitMQ (kombu, no Celery client).

One :class:`TaskClient` per web process, started lazily (so it is created after gunicorn forks):

* request threads call :meth:`TaskClient.predict` with validated rows and block on an event;
* the *batcher* thread owns the publishing connection. It takes the first waiting request, waits
  for a free in-flight slot (at most ``MODELSERVE_BATCH_MAX_INFLIGHT`` tasks per process — while
  it waits, concurrent requests pile up), then sends everything queued (up to
  ``MODELSERVE_BATCH_MAX_ROWS`` rows, see :meth:`TaskClient._gather_batch`) as ONE
  ``modelserve.predict`` task;
* the *reply* thread owns a second connection consuming a private exclusive reply queue; the
  worker's rpc result backend answers there with ``correlation_id`` = task id, and the reply
  thread fans the probabilities back out to the waiting requests. On the same connection it
  keeps the latest status of every worker (a private queue bound to the workers' status fanout
  exchange: :meth:`TaskClient.fleet`) and, about once a second, the prediction queue's consumer
  count (a passive declare: :meth:`TaskClient.consumers`). Workers consume only while they have
  a model, so that count is the number of workers that can answer a prediction now.

The web declares nothing it shares with others: the workers declare the task queue, its exchange
and their status exchange, the web only checks they exist (passive declares). Its broker user may
publish to the task exchange and use its own ``modelserve.reply.*``/``modelserve.status.*`` queues,
nothing more (roles/rabbitmq, "Users and permissions"): it cannot delete, purge or read the queue.

Every wait is bounded: no answer within ``MODELSERVE_TASK_TIMEOUT`` (or no broker) raises
:class:`ServiceUnavailable`, which the web turns into a 503. Messages carry the same TTL, so a
task nobody consumed in time is dropped by RabbitMQ instead of piling up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

from kombu import Connection, Consumer, Producer, Queue

from modelserve.config import Settings
from modelserve.metrics import Metrics
from modelserve.protocol import (
    STATUS_STATES,
    TASK_PREDICT,
    status_queue,
    task_exchange,
    task_message,
    task_producer,
)
from modelserve.wire import DEFAULT_THRESHOLD, PackedRows, Scores, pack_batch, read_answer, unpack_scores

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
CONSUMERS_EVERY = 1.0  # seconds between passive declares of the prediction queue
MAX_FLEET = 1000  # worker statuses kept at most (anyone on the vhost can publish one)
CONFIRM_CHECKS = 0.1  # seconds between reads of the publisher confirms (at most)
CONFIRM_FRAMES = 1000  # frames read from the publishing connection at most per check


class ServiceUnavailable(Exception):
    def __init__(self, reason: str, kind: str = "unavailable") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class _Call:
    __slots__ = ("args", "error", "event", "result", "rows", "task")

    def __init__(self, task: str, rows: list | PackedRows | None = None, args: list | None = None) -> None:
        self.task = task
        self.rows = rows
        self.args = args
        self.event = threading.Event()
        self.result: Any = None
        self.error: ServiceUnavailable | None = None

    def fail(self, error: ServiceUnavailable) -> None:
        self.error = error
        self.event.set()


class _Pending:
    __slots__ = ("calls", "deadline", "sent", "slot", "task")

    def __init__(self, task: str, calls: list[_Call], slot: bool, timeout: float) -> None:
        self.task = task
        self.calls = calls
        self.slot = slot
        self.sent = time.monotonic()
        self.deadline = self.sent + timeout


class BrokerNodes:
    """Every broker node's URL; connections go to the next node that answers (failover).

    Each web process starts at a random node, so the processes spread over the cluster, and a
    connection lost on one node is made again from the node after it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.urls = settings.broker_urls or [settings.broker_url]
        self._next = random.randrange(len(self.urls))  # noqa: S311 - load spreading, not security

    def connect(self) -> Connection:
        """A connection with AMQP heartbeats to the first node that answers, each tried once."""
        error: Exception | None = None
        for _ in range(len(self.urls)):
            url = self.urls[self._next]
            self._next = (self._next + 1) % len(self.urls)
            conn = Connection(
                url,
                connect_timeout=self.settings.broker_connect_timeout,
                heartbeat=self.settings.broker_heartbeat,
                ssl=self.settings.broker_ssl(),
            )
            try:
                conn.connect()
                return conn
            except Exception as exc:
                error = exc
                with contextlib.suppress(Exception):
                    conn.release()
        raise error or ConnectionError("no broker URL")


def keep_alive(conn: Connection) -> None:
    """Read what the broker sent (its heartbeats) and send ours when due.

    py-amqp counts a heartbeat as received only when the socket is read: a connection that only
    publishes must drain it too, or it would give the broker up as dead.
    """
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=0.001)
    conn.heartbeat_check()


class TaskClient:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.max_inflight = settings.batch_max_inflight
        # Heartbeat chores at 4 per interval (the broker allows two intervals of silence).
        self.keepalive_interval = settings.broker_heartbeat / 4 if settings.broker_heartbeat else None
        self._pid = -1
        self._start_lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
            self._pending: dict[str, _Pending] = {}
            self._lock = threading.Lock()
            self._slots = threading.Semaphore(self.max_inflight)
            self._reply_to: str | None = None
            self._reply_ready = threading.Event()
            self._pub: Connection | None = None
            self._producer: Producer | None = None
            self._last_failure = 0.0
            self._last_error = ""
            self._publish_reason = ""  # why the last publisher connection was refused, when not the broker
            # Publisher confirms of the current publishing channel, read by the batcher thread:
            # delivery tag -> (monotonic time published, task id), oldest first.
            self._unconfirmed: OrderedDict[int, tuple[float, str]] = OrderedDict()
            self._published = 0  # delivery tags count the channel's publishes from 1
            self._refused: list[str] = []  # task ids the broker nacked, answered 503 by the batcher
            self._stop = threading.Event()
            self._consumers: tuple[float, int] | None = None  # (monotonic time, count)
            self._consumers_seen = threading.Event()
            self._fleet: dict[str, tuple[float, dict[str, Any]]] = {}
            self._fleet_since = 0.0
            self._fleet_seen = threading.Event()
            self._recount = False  # a worker started or stopped consuming: count again now
            self._nodes = BrokerNodes(self.settings)
            self._pid = os.getpid()
            threading.Thread(target=self._reply_loop, name="modelserve-replies", daemon=True).start()
            threading.Thread(target=self._batch_loop, name="modelserve-batcher", daemon=True).start()

    def start(self) -> None:
        """Connect now rather than on the first request (idempotent, per process)."""
        self._ensure_started()

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        self._stop.set()
        self._queue.put(None)  # type: ignore[arg-type]

    # --- API for request threads --------------------------------------------------------------

    def predict(self, rows: list[list[float]] | PackedRows, timeout: float | None = None) -> dict[str, Any]:
        """Probabilities for validated rows; raises ServiceUnavailable (never hangs)."""
        return self._submit(_Call(TASK_PREDICT, rows=rows), timeout)

    def call(self, task: str, args: list[Any], timeout: float | None = None) -> Any:
        """One task, not batched (model info)."""
        return self._submit(_Call(task, args=args), timeout)

    def _submit(self, call: _Call, timeout: float | None) -> Any:
        self._ensure_started()
        timeout = self.settings.task_timeout if timeout is None else timeout
        self._queue.put(call)
        if not call.event.wait(timeout):
            raise ServiceUnavailable(f"no worker answered within {timeout:g} s", "timeout")
        if call.error is not None:
            raise call.error
        return call.result

    def broker_reachable(self) -> tuple[bool, str]:
        self._ensure_started()
        if self._reply_ready.is_set():
            return True, ""
        return False, self._last_error or "not connected to the broker yet"

    def consumers(self, wait: float = 0.0) -> int | None:
        """Consumers of the prediction queue at the last check, None if unknown or stale."""
        self._ensure_started()
        self._consumers_seen.wait(wait)
        seen = self._consumers
        if seen is None or time.monotonic() - seen[0] > 3 * CONSUMERS_EVERY + 1:
            return None
        return seen[1]

    def fleet(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """The latest unexpired status of every worker (waits up to ``wait`` for a first one)."""
        self._ensure_started()
        if not self._fleet_seen.is_set() and self._reply_ready.is_set():
            # Just subscribed: every worker reports within a status interval.
            left = self._fleet_since + self.settings.status_interval + 0.5 - time.monotonic()
            self._fleet_seen.wait(max(0.0, min(wait, left)))
        now = time.monotonic()
        with self._lock:
            for worker in [w for w, (t, s) in self._fleet.items() if now - t > s["ttl"]]:
                del self._fleet[worker]
            items = list(self._fleet.values())
        return [{**status, "seen_seconds_ago": round(now - t, 1)} for t, status in items]

    # --- batcher thread: publishing -----------------------------------------------------------

    def _batch_loop(self) -> None:
        carry: deque[_Call] = deque()
        last_keepalive = last_confirms = time.monotonic()
        # Confirms are read this often while publishes await them (a read costs a short wait).
        confirm_checks = min(CONFIRM_CHECKS, self.settings.broker_confirm_timeout / 10)
        while not self._stop.is_set():
            if self._unconfirmed and time.monotonic() - last_confirms >= confirm_checks:
                self._check_confirms()
                last_confirms = time.monotonic()
            if self.keepalive_interval and time.monotonic() - last_keepalive >= self.keepalive_interval:
                self._publisher_keepalive()
                last_keepalive = time.monotonic()
            wait = self.keepalive_interval
            if self._unconfirmed:
                wait = min(wait or confirm_checks, confirm_checks)
            try:
                first = carry.popleft() if carry else self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            if first is None:
                return
            if first.task != TASK_PREDICT:
                self._send(first.task, first.args or [], [first], slot=False)
                continue
            # Nagle-style: while all in-flight slots are busy, more requests queue up behind us.
            slot = self._acquire_slot(confirm_checks)
            batch, rows = self._gather_batch(first, carry)
            packed = pack_batch([call.rows or [] for call in batch])
            self._send(TASK_PREDICT, [packed], batch, slot=slot, rows=rows)

    def _acquire_slot(self, confirm_checks: float) -> bool:
        """An in-flight slot, waiting at most the task timeout; meanwhile the confirms are read (a
        stalled channel holds its slots until it is given up)."""
        deadline = time.monotonic() + self.settings.task_timeout
        while True:
            left = deadline - time.monotonic()
            if self._slots.acquire(timeout=max(0.0, min(left, confirm_checks))):
                return True
            if left <= 0:
                return False
            if self._unconfirmed:
                self._check_confirms()

    def _gather_batch(self, first: _Call, carry: deque[_Call]) -> tuple[list[_Call], int]:
        """Where a prediction batch is formed: ``first`` and the predict calls queued behind it.

        Up to ``batch_max_rows`` rows, waiting at most ``batch_wait_ms`` for more. A call that does
        not fit, and any other task met on the way, is left in ``carry`` for the next round.
        Returns the calls (in arrival order, the order of their rows in the task) and the row count.
        """
        batch, rows = [first], len(first.rows or [])
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000.0
        while rows < self.settings.batch_max_rows:
            try:
                remaining = deadline - time.monotonic()
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._stop.set()
                break
            if nxt.task != TASK_PREDICT or rows + len(nxt.rows or []) > self.settings.batch_max_rows:
                carry.append(nxt)
                if nxt.task == TASK_PREDICT:
                    break
                continue
            batch.append(nxt)
            rows += len(nxt.rows or [])
        return batch, rows

    def _connect_publisher(self) -> Producer:
        if self._producer is not None:
            return self._producer
        if time.monotonic() - self._last_failure < 1.0:
            self._raise_publish_failure()
        if not self._reply_ready.wait(self.settings.broker_connect_timeout):
            raise ServiceUnavailable(f"broker unreachable: {self._last_error or 'no reply queue'}", "broker")
        conn = None
        try:
            conn = self._nodes.connect()
            channel = conn.channel()
            # Passive: the workers declare the exchange and the queue (a task published to a missing
            # exchange would be lost with the channel).
            task_exchange(self.settings.task_queue)(channel).declare(passive=True)
            # Publisher confirms, read without waiting for them (the batcher drains them): a channel
            # that stops confirming is given up for the next node. Seen in a partition: a channel
            # opened while the task queue's leader was on the cut-off node sent every publish there
            # (refused after each failed connection attempt) until the partition healed.
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_confirmed)
            channel.events["basic_nack"].add(self._on_refused)
            self._unconfirmed.clear()
            self._published = 0
            self._producer = task_producer(channel, self.settings.task_queue)
        except Exception as exc:
            self._publisher_failed(conn, exc)
            if getattr(exc, "reply_code", None) == 404:
                self._publish_reason = (
                    f"no task queue {self.settings.task_queue!r} yet: no worker has started"
                )
            self._raise_publish_failure()
        self._pub = conn
        return self._producer

    def _raise_publish_failure(self) -> None:
        if self._publish_reason:  # the broker answered: the task exchange does not exist yet
            raise ServiceUnavailable(self._publish_reason, "no_queue") from None
        raise ServiceUnavailable(f"broker unreachable: {self._last_error}", "broker") from None

    def _publisher_keepalive(self) -> None:
        """Heartbeats of the publishing connection, in the batcher thread that owns it."""
        if self._pub is None:
            return
        try:
            keep_alive(self._pub)
        except Exception as exc:
            self._publisher_failed(self._pub, exc)

    def _on_confirmed(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple)

    def _on_refused(self, delivery_tag: int, multiple: bool) -> None:
        self._refused.extend(self._settle(delivery_tag, multiple))

    def _settle(self, delivery_tag: int, multiple: bool) -> list[str]:
        """Forgets the confirmed publishes (up to the tag when multiple); returns their task ids."""
        if not multiple:
            entry = self._unconfirmed.pop(delivery_tag, None)
            return [entry[1]] if entry else []
        settled = []
        while self._unconfirmed and next(iter(self._unconfirmed)) <= delivery_tag:
            settled.append(self._unconfirmed.popitem(last=False)[1][1])
        return settled

    def _check_confirms(self) -> None:
        """Reads the broker's confirms; answers refused tasks 503 at once, and gives the publishing
        connection up when its oldest publish is unconfirmed past the confirm timeout."""
        pub = self._pub
        if pub is None:
            return
        try:
            for _ in range(CONFIRM_FRAMES):  # bounded: a busy broker must not starve the batcher
                pub.drain_events(timeout=0.001)
        except TimeoutError:
            pass  # nothing more to read now
        except Exception as exc:
            self._publisher_failed(pub, exc)
            return
        refused, self._refused = self._refused, []
        for task_id in refused:
            self._finish(task_id, ServiceUnavailable("the broker refused the task (nack)", "broker"))
        if refused:
            # The task queue has no length limit, so a nack means the queue could not take the
            # task, and a channel that asks a cut-off quorum leader keeps being refused after a
            # new leader is elected: the next publish goes through a new connection (next node).
            self._give_up_publisher(pub, ConnectionError(f"the broker refused {len(refused)} task(s)"))
            return
        if self._unconfirmed:
            published, _ = next(iter(self._unconfirmed.values()))
            waited = time.monotonic() - published
            if waited > self.settings.broker_confirm_timeout:
                self._give_up_publisher(pub, TimeoutError(f"no publisher confirm for {waited:.1f} s"))

    def _give_up_publisher(self, pub: Connection, exc: Exception) -> None:
        """Abandons a publishing connection that stalls or refuses; the tasks still unconfirmed on
        it are answered 503 now (a worker's late answer is ignored): they hold the in-flight slots
        the next publishes need."""
        unsettled = [task_id for _, task_id in self._unconfirmed.values()]
        self._publisher_failed(pub, exc, abandon=True)
        for task_id in unsettled:
            self._finish(task_id, ServiceUnavailable("the broker did not confirm the task", "broker"))

    def _publisher_failed(self, conn: Connection | None, exc: Exception, abandon: bool = False) -> None:
        """Forgets the publishing connection. `abandon` (a stalled channel; the nodes answer):
        its socket is closed without AMQP's close handshake, which the stalled channel would hold
        up, and the next publish connects to the next node at once, without the pause after a
        failed connection."""
        self._publish_reason = ""
        if not abandon:
            self._last_failure = time.monotonic()
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.warning("publishing to the broker failed: %s", self._last_error)
        self._producer = None
        self._pub = None
        # Their fate is unknown: a worker may still answer them; otherwise they time out.
        self._unconfirmed.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect() if abandon else conn.release()

    def _send(self, task: str, args: list[Any], calls: list[_Call], slot: bool, rows: int = 0) -> None:
        try:
            producer = self._connect_publisher()
        except ServiceUnavailable as exc:
            if slot:
                self._slots.release()
            for call in calls:
                call.fail(exc)
            return
        reply_to = self._reply_to or ""
        timeout = self.settings.task_timeout
        message = task_message(task, args, reply_to=reply_to)
        with self._lock:
            self._pending[message.id] = _Pending(task, calls, slot, timeout)
        try:
            message.publish(producer, self.settings.task_queue, ttl=timeout)
        except Exception as exc:
            self._publisher_failed(self._pub, exc)
            self._finish(message.id, ServiceUnavailable(f"broker unreachable: {self._last_error}", "broker"))
            return
        self._published += 1
        self._unconfirmed[self._published] = (time.monotonic(), message.id)
        if task == TASK_PREDICT:
            self.metrics.batch_rows.labels(task).observe(rows)

    # --- reply thread --------------------------------------------------------------------------

    def _reply_loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._nodes.connect()
                name = f"modelserve.reply.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                reply_queue = Queue(name, exclusive=True, auto_delete=True, durable=False)
                channel = conn.channel()
                consumer = Consumer(channel, queues=[reply_queue], no_ack=True, on_message=self._on_reply)
                consumer.consume()
                self._reply_to = name
                self._reply_ready.set()
                backoff = 0.2
                probe, next_probe = None, 0.0
                statuses = None
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.25)
                    conn.heartbeat_check()
                    self._sweep()
                    if self._recount or time.monotonic() >= next_probe:
                        self._recount = False
                        next_probe = time.monotonic() + CONSUMERS_EVERY
                        probe = self._count_consumers(conn, probe)
                        statuses = statuses or self._subscribe_status(conn, name)
            except Exception as exc:
                self._reply_ready.clear()
                self._consumers = None
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._last_failure = time.monotonic()
                log.warning("reply consumer lost the broker: %s", self._last_error)
                self._fail_all(ServiceUnavailable(f"lost the broker: {self._last_error}", "broker"))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.release()

    def _subscribe_status(self, conn: Connection, reply_name: str) -> Any:
        """The workers' statuses, on a channel of their own; None (tried again at the next probe)
        while their exchange does not exist: no worker has started since the broker did, and the
        web may not declare it. Predictions never wait for it."""
        channel = conn.channel()
        statuses = status_queue(self.settings.task_queue, reply_name.replace(".reply.", ".status.", 1))
        try:
            Consumer(channel, queues=[statuses], no_ack=True, on_message=self._on_status).consume()
        except conn.channel_errors:
            with contextlib.suppress(Exception):
                channel.close()
            return None
        self._fleet_since = time.monotonic()
        return channel

    def _count_consumers(self, conn: Connection, probe: Any) -> Any:
        """Passive declare on its own channel (a missing queue closes the channel it was asked on)."""
        try:
            probe = probe or conn.channel()
            count = probe.queue_declare(queue=self.settings.task_queue, passive=True).consumer_count
        except conn.channel_errors:
            count, probe = 0, None  # no such queue yet: nobody consumes it
        self._consumers = (time.monotonic(), int(count))
        self._consumers_seen.set()
        return probe

    def _on_status(self, message) -> None:
        try:
            status = json.loads(message.body)
            worker, state = str(status["worker"])[:200], status["state"]
            ttl = min(max(float(status.get("ttl", 10)), 1.0), 300.0)
        except (TypeError, ValueError, KeyError):
            return
        if state not in STATUS_STATES:
            return
        with self._lock:
            before = self._fleet.get(worker, (0.0, {}))[1].get("consuming")
            if state == "stopped":
                self._fleet.pop(worker, None)
            elif worker in self._fleet or len(self._fleet) < MAX_FLEET:
                self._fleet[worker] = (time.monotonic(), {**status, "worker": worker, "ttl": ttl})
        if state == "stopped" or before != status.get("consuming"):
            self._recount = True
        self._fleet_seen.set()

    def _on_reply(self, message) -> None:
        try:
            body = json.loads(message.body)
        except (TypeError, ValueError):
            return
        if not isinstance(body, dict) or body.get("status") not in FINAL_STATES:
            return  # RETRY/STARTED notifications: the final answer comes later
        task_id = message.properties.get("correlation_id") or body.get("task_id")
        if body["status"] == "SUCCESS":
            self._finish(task_id, body.get("result"))
        else:
            result = body.get("result") or {}
            detail = result.get("exc_message") if isinstance(result, dict) else result
            self._finish(task_id, ServiceUnavailable(f"worker failed: {detail}", "worker"))

    def _finish(self, task_id: str, outcome: Any) -> None:
        with self._lock:
            pending = self._pending.pop(task_id, None)
        if pending is None:
            return  # duplicate (redelivered) or already timed out
        if pending.slot:
            self._slots.release()
        if isinstance(outcome, ServiceUnavailable):
            for call in pending.calls:
                call.fail(outcome)
            return
        self.metrics.roundtrip.labels(pending.task).observe(time.monotonic() - pending.sent)
        if pending.task != TASK_PREDICT:
            pending.calls[0].result = outcome
            pending.calls[0].event.set()
            return
        try:
            results = self._shares(outcome, [len(call.rows or []) for call in pending.calls])
        except (KeyError, TypeError, ValueError) as exc:
            for call in pending.calls:
                call.fail(ServiceUnavailable(f"malformed worker answer: {exc}", "worker"))
            return
        for call, result in zip(pending.calls, results, strict=True):
            call.result = result
            call.event.set()

    @staticmethod
    def _shares(outcome: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
        """Each request's part of a batch's answer, in the order of its rows. A packed answer stays
        float32 (wire.Scores: lists only when a handler reads them)."""
        worker, start, out = outcome.get("worker"), 0, []
        if "p32" in outcome:
            version, scores = outcome["model_version"], unpack_scores(outcome["p32"])
            threshold = float(outcome.get("threshold", DEFAULT_THRESHOLD))
            for n in sizes:
                out.append(
                    Scores(
                        worker=worker,
                        model_version=version,
                        scores=scores[start : start + n],
                        threshold=threshold,
                    )
                )
                start += n
            return out
        version, probs, labels = read_answer(outcome)
        for n in sizes:
            share = {"probabilities": probs[start : start + n], "labels": labels[start : start + n]}
            out.append({"worker": worker, "model_version": version, **share})
            start += n
        return out

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [tid for tid, p in self._pending.items() if p.deadline + 1.0 < now]
        for tid in expired:
            self._finish(tid, ServiceUnavailable("no worker answered in time", "timeout"))

    def _fail_all(self, error: ServiceUnavailable) -> None:
        with self._lock:
            ids = list(self._pending)
        for tid in ids:
            self._finish(tid, error)
