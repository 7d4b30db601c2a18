import json

import pytest
from modelserve_edge.config import ConfigError, env_float
from modelserve_edge.router import Router


class Recorder:
    def __init__(self):
        self.sent = []

    def __call__(self, output, body):
        self.sent.append((output, json.loads(body)))


READING = {"deviceId": "engine-01", "cycle": 3, "settings": [0, 0, 100], "sensors": [1.0] * 21}


def test_device_reading_goes_to_classifier_unchanged():
    rec = Recorder()
    Router(rec).handle("deviceInput", json.dumps(READING).encode())
    assert rec.sent == [("classify", READING)]


def test_rul_goes_to_avro_whole_and_upstream_as_device_and_rul():
    rec = Recorder()
    answer = {**READING, "RUL": 42.5, "modelVersion": "1.0.0"}
    Router(rec).handle("rulInput", json.dumps(answer).encode())
    assert rec.sent == [("writeAvro", answer), ("toIotHub", {"deviceId": "engine-01", "RUL": 42.5})]


@pytest.mark.parametrize(("rul", "alert"), [(10.0, True), (29.99, True), (30.0, False), (125.0, False)])
def test_threshold_filters_upstream_only(rul, alert):
    rec = Recorder()
    Router(rec, alert_threshold=30.0).handle("rulInput", json.dumps({**READING, "RUL": rul}).encode())
    outputs = [o for o, _ in rec.sent]
    assert outputs == (["writeAvro", "toIotHub"] if alert else ["writeAvro"])


@pytest.mark.parametrize(
    ("input_name", "body"),
    [
        ("deviceInput", b"not json"),
        ("deviceInput", b"[1, 2]"),
        ("deviceInput", json.dumps({"cycle": 1}).encode()),
        ("rulInput", json.dumps(READING).encode()),  # no RUL
        ("rulInput", json.dumps({**READING, "RUL": "12"}).encode()),
        ("rulInput", json.dumps({**READING, "RUL": True}).encode()),
        ("otherInput", json.dumps({**READING, "RUL": 1.0}).encode()),
    ],
)
def test_malformed_or_unknown_messages_are_dropped(input_name, body):
    rec = Recorder()
    Router(rec).handle(input_name, body)
    assert rec.sent == []


def test_threshold_from_environment():
    assert env_float("RUL_ALERT_THRESHOLD", None, {}) is None
    assert env_float("RUL_ALERT_THRESHOLD", None, {"RUL_ALERT_THRESHOLD": "25"}) == 25.0
    with pytest.raises(ConfigError, match="RUL_ALERT_THRESHOLD"):
        env_float("RUL_ALERT_THRESHOLD", None, {"RUL_ALERT_THRESHOLD": "soon"})
