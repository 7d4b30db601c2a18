"""Every class of bad input answers 4xx JSON naming the field (Flask app, task layer = test double)."""

import json

import pytest
from modelserve.features import FEATURES, InputError, validate_request, validate_row

GOOD = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
GOOD_OBJ = dict(zip(FEATURES, GOOD, strict=True))


def post(client, body, raw=False, **kw):
    data = body if raw else json.dumps(body)
    return client.post("/api/v1/predict", data=data, content_type=kw.pop("content_type", "application/json"))


def test_list_and_object_rows_give_the_same_answer(client):
    r = post(client, {"rows": [GOOD, GOOD_OBJ]})
    assert r.status_code == 200, r.json
    body = r.json
    assert body["model_version"] == "1.0.0"
    assert len(body["predictions"]) == 2
    assert body["predictions"][0] == body["predictions"][1]
    assert body["predictions"][0]["probability"] == pytest.approx(148 / 200)
    assert body["predictions"][0]["label"] == 1


def test_single_row_and_instances_forms(client, fake_tasks):
    r = post(client, {"row": GOOD_OBJ})
    assert r.status_code == 200
    assert r.json["prediction"] == r.json["predictions"][0]
    r = post(client, {"instances": [GOOD]})
    assert r.status_code == 200 and len(r.json["predictions"]) == 1
    assert fake_tasks.calls[-1] == ("predict", [[float(v) for v in GOOD]])


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"rows": [GOOD, [1, 2, 3]]}, 422, "rows[1]"),
        ({"rows": [GOOD, GOOD, GOOD, {**GOOD_OBJ, "glucose": "high"}]}, 422, "rows[3].glucose"),
        ({"rows": [[*GOOD[:1], None, *GOOD[2:]]]}, 422, "rows[0][1]"),
        ({"rows": [[*GOOD[:7], True]]}, 422, "rows[0][7]"),
        ({"rows": [{**GOOD_OBJ, "bmi": -1}]}, 422, "rows[0].bmi"),
        ({"rows": [[-2, *GOOD[1:]]]}, 422, "rows[0][0]"),
        ({"rows": [{**GOOD_OBJ, "age": 1e6}]}, 422, "rows[0].age"),
        ({"rows": [{**GOOD_OBJ, "cholesterol": 1}]}, 422, "rows[0].cholesterol"),
        ({"rows": [{k: v for k, v in GOOD_OBJ.items() if k != "insulin"}]}, 422, "rows[0].insulin"),
        ({"rows": ["6,148,72"]}, 422, "rows[0]"),
        ({"rows": []}, 422, "rows"),
        ({"instances": []}, 422, "instances"),
        ({"rows": GOOD_OBJ}, 422, "rows"),
        ({"rows": [GOOD], "extra": 1}, 422, "extra"),
        ({"rows": [GOOD], "row": GOOD}, 422, "rows"),
        ({}, 422, "rows"),
        ({"rows": [GOOD] * 51}, 413, "rows"),
    ],
)
def test_bad_rows_name_the_field(client, fake_tasks, body, status, field):
    r = post(client, body)
    assert r.status_code == status, r.json
    assert r.is_json
    assert r.json["field"] == field
    assert r.json["error"]
    assert fake_tasks.calls == []  # nothing reached the workers


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected_with_field(client, token):
    raw = '{"rows": [[6, 148, 72, 35, 0, ' + token + ", 0.627, 50]]}"
    r = post(client, raw, raw=True)
    assert r.status_code == 422
    assert r.json["field"] == "rows[0][5]"
    assert "finite" in r.json["error"]


def test_huge_integer_is_rejected_not_crashing(client):
    raw = '{"row": [6, 148, 72, 35, 0, %s, 0.627, 50]}' % ("9" * 400)
    r = post(client, raw, raw=True)
    assert r.status_code == 422
    assert r.json["field"] == "row[5]"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"not json",
        b'{"rows": [',
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"42",
        b"null",
        b"[" * 50000,
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_non_json_or_non_object_body_is_400(client, raw):
    r = client.post("/api/v1/predict", data=raw, content_type="application/json")
    assert r.status_code == 400
    assert r.is_json and r.json["error"]


def test_body_too_large_is_413_json(client):
    r = client.post("/api/v1/predict", data=b"{" + b" " * 2_000_000 + b"}", content_type="application/json")
    assert r.status_code == 413
    assert r.is_json and "too large" in r.json["error"]


def test_wrong_method_and_unknown_path_are_json(client):
    r = client.get("/api/v1/predict")
    assert r.status_code == 405 and r.is_json
    r = client.get("/nope")
    assert r.status_code == 404 and r.is_json


def test_unavailable_workers_give_503_with_reason():
    from conftest import FakeTaskLayer, make_settings
    from modelserve.web import create_app

    app = create_app(make_settings(), tasks=FakeTaskLayer(fail="no worker answered within 5 s"))
    c = app.test_client()
    r = c.post("/api/v1/predict", json={"row": GOOD})
    assert r.status_code == 503
    assert "no worker answered" in r.json["error"]
    assert r.headers["Retry-After"] == "1"
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json["ready"] is False and r.json["reasons"]
    assert c.get("/api/v1/model").status_code == 503
    assert c.get("/healthz").status_code == 200  # alive even when not ready


def test_validate_row_unit():
    assert validate_row(GOOD, "r") == [float(v) for v in GOOD]
    with pytest.raises(InputError) as err:
        validate_row([*GOOD[:8], 1], "r")
    assert err.value.field == "r"
    rows, single = validate_request({"row": GOOD_OBJ}, 10)
    assert single and rows == [[float(v) for v in GOOD]]
