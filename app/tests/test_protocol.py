"""The web <-> worker message format and the batcher's fan-out (no broker needed)."""

import base64
import os
import queue
import threading
from collections import deque

import pytest
from modelserve.client import ServiceUnavailable, TaskClient, _Call, _Pending
from modelserve.model import LoadedModel
from modelserve.protocol import TASK_PREDICT, task_message
from modelserve.wire import DEFAULT_THRESHOLD, labels, pack_rows, read_answer, unpack_floats, unpack_rows
from ms_support import make_settings

ROWS = [
    [6, 148, 72, 35, 0, 33.6, 0.627, 50],
    [1, 85, 66, 29, 0, 26.6, 0.351, 31],
    [2, 197, 70, 45, 543, 30.5, 0.158, 53],
]


def test_pack_roundtrip_is_float32_exact():
    values = unpack_floats(pack_rows(ROWS))
    assert len(values) == 24
    assert values[:8] == pytest.approx(ROWS[0], rel=1e-6)
    with pytest.raises(ValueError):
        unpack_floats(base64.b64encode(b"abc").decode())


def test_the_label_rule_and_both_answer_forms():
    assert DEFAULT_THRESHOLD == 0.5
    assert labels([0.2, 0.5, 0.9]) == [0, 1, 1]  # the threshold itself is positive
    assert labels([0.2, 0.5, 0.9], threshold=0.95) == [0, 0, 0]
    packed = {"model_version": "2.0.0", "threshold": 0.25, "p32": pack_rows([[0.1, 0.3]])}
    version, probs, labs = read_answer(packed)
    assert version == "2.0.0" and probs == pytest.approx([0.1, 0.3]) and labs == [0, 1]
    as_lists = {"model_version": "2.0.0", "probabilities": [0.7], "labels": [1]}
    assert read_answer(as_lists) == ("2.0.0", [0.7], [1])
    with pytest.raises(ValueError, match="multiple of 8"):
        unpack_rows(base64.b64encode(b"\0" * 12).decode())
    with pytest.raises(ValueError, match="non-empty"):
        unpack_rows("")


def test_celery_message_shape():
    task_id, headers, props, body = task_message(TASK_PREDICT, ["x"], reply_to="replies")
    assert headers["task"] == TASK_PREDICT and headers["id"] == task_id and headers["retries"] == 0
    assert props == {"correlation_id": task_id, "reply_to": "replies"}
    assert body[0] == ["x"] and body[1] == {}


def test_packed_prediction_equals_list_prediction(seed_release):
    model = LoadedModel(seed_release)
    packed = model.predict_packed(pack_rows(ROWS))
    assert packed["model_version"] == "1.0.0"
    assert unpack_floats(packed["p32"]) == pytest.approx(model.predict(ROWS)["probabilities"], abs=1e-6)
    with pytest.raises(ValueError, match="multiple of 8"):
        model.predict_packed(base64.b64encode(b"\0" * 12).decode())
    nan_rows = pack_rows([[float("nan")] * 8])
    with pytest.raises(ValueError, match="NaN"):
        model.predict_packed(nan_rows)


def _client() -> TaskClient:
    client = TaskClient(make_settings())
    # Only the bookkeeping, not the AMQP threads: pretend this process already started them.
    client._pid = os.getpid()
    client._pending = {}
    client._lock = threading.Lock()
    client._slots = threading.Semaphore(1)
    return client


def test_reply_fans_out_to_each_request_in_order(seed_release):
    client = _client()
    calls = [_Call(TASK_PREDICT, rows=ROWS[:1]), _Call(TASK_PREDICT, rows=ROWS[1:])]
    client._slots.acquire()
    client._pending["t1"] = _Pending(TASK_PREDICT, calls, slot=True, timeout=5)
    answer = LoadedModel(seed_release).predict_packed(pack_rows(ROWS))
    answer["worker"] = "w:1"
    client._finish("t1", answer)
    assert all(c.event.is_set() for c in calls)
    assert calls[0].result["labels"] == [1]
    assert calls[1].result["labels"] == [0, 1]
    assert len(calls[1].result["probabilities"]) == 2
    assert calls[1].result["worker"] == "w:1"
    assert client._slots.acquire(blocking=False)  # the in-flight slot was given back
    client._finish("t1", answer)  # a duplicate (redelivered task) is ignored
    assert client.metrics.sample("modelserve_queue_roundtrip_seconds_count", {"task": TASK_PREDICT}) == 1


def test_failure_and_malformed_replies_become_503s():
    client = _client()
    a, b = _Call(TASK_PREDICT, rows=ROWS[:1]), _Call(TASK_PREDICT, rows=ROWS[:1])
    client._pending["t1"] = _Pending(TASK_PREDICT, [a], slot=False, timeout=5)
    client._pending["t2"] = _Pending(TASK_PREDICT, [b], slot=False, timeout=5)
    client._finish("t1", ServiceUnavailable("worker failed: boom", "worker"))
    client._finish("t2", {"model_version": "1.0.0", "p32": "!!"})
    assert isinstance(a.error, ServiceUnavailable) and "boom" in a.error.reason
    assert isinstance(b.error, ServiceUnavailable) and "malformed" in b.error.reason


def test_expired_requests_are_swept():
    client = _client()
    call = _Call(TASK_PREDICT, rows=ROWS[:1])
    client._pending["old"] = _Pending(TASK_PREDICT, [call], slot=False, timeout=-5)
    client._sweep()
    assert client._pending == {}
    assert call.error is not None and call.error.kind == "timeout"


def test_a_batch_takes_waiting_predict_calls_up_to_the_row_limit():
    client = _client()
    client.settings = make_settings(MODELSERVE_BATCH_MAX_ROWS="4")
    client._queue = queue.SimpleQueue()
    first, second, info, third, fourth = (
        _Call(TASK_PREDICT, rows=ROWS[:1]),
        _Call(TASK_PREDICT, rows=ROWS[:2]),
        _Call("modelserve.model_info", args=[]),
        _Call(TASK_PREDICT, rows=ROWS[:2]),
        _Call(TASK_PREDICT, rows=ROWS[:1]),
    )
    for call in (second, info, third, fourth):
        client._queue.put(call)
    carry: deque = deque()
    batch, rows = client._gather_batch(first, carry)
    assert batch == [first, second] and rows == 3
    assert list(carry) == [info, third]  # the other task waits its turn; third would exceed 4 rows
    assert client._queue.get_nowait() is fourth  # not taken: the batch was closed at third


def test_packed_shares_make_the_same_lists_and_int32_labels():
    from array import array

    import numpy as np
    from modelserve.wire import Scores, labels_int32

    scores = array("f", [0.0, 0.25, 0.5, 0.75, 1.0, float("nan"), float("inf")])
    # Thresholds that float32 cannot hold, and scores one float32 step either side of them.
    odd = (0.1, 1 / 3, 0.7, 1e-30)
    near = array("f", [x for t in odd for x in (t, *np.nextafter(np.float32(t), [0, 1], dtype=np.float32))])
    for threshold in (0.5, *odd, 0.0, -0.0, 1.0, -1.0, float("nan"), 1e39):
        for values in (near, array("f", [v for v in scores if v == v]), array("f", [-0.5, 0.5])):
            assert labels_int32(values, threshold).tolist() == labels(values.tolist(), threshold), threshold
        expected = labels(scores.tolist(), threshold)
        assert labels_int32(scores, threshold).tolist() == expected
        share = Scores(model_version="1.0.0", worker="w", scores=scores, threshold=threshold)
        assert share["labels"] == expected and str(share["probabilities"]) == str(scores.tolist())  # NaN
    with pytest.raises(KeyError):
        Scores(scores=scores, threshold=0.5)["other"]
