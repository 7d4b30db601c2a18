"""The Open Inference Protocol (/v2): the blueprint on a test double, then clients nobody here wrote
(``tritonclient.http``, the ``kserve`` REST client) and a schemathesis run against the live stack."""

from __future__ import annotations

import asyncio
import json
import struct
from collections import defaultdict

import httpx
import numpy as np
import pytest
import requests
from conftest import DATA
from ms_support import requires_rabbitmq

MODEL = "pima-diabetes"
ROWS = [[float(v) for v in line.split(",")[:8]] for line in DATA.read_text().splitlines()[:64]]
INFER = f"/v2/models/{MODEL}/infer"


def _tensor(rows, datatype="FP32", **extra):
    return {"name": "input", "datatype": datatype, "shape": [len(rows), 8], **extra}


def _binary_body(rows, datatype="FP64", **params):
    fmt = {"FP32": "f", "FP64": "d"}[datatype]
    raw = struct.pack(f"<{len(rows) * 8}{fmt}", *(v for row in rows for v in row))
    header = json.dumps(
        {"inputs": [_tensor(rows, datatype, parameters={"binary_data_size": len(raw)})], "parameters": params}
    ).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


# --- the blueprint, on the test double (tests/ms_support.FakeTaskLayer) --------------------------


def test_server_and_model_metadata(client):
    assert client.get("/v2").json["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").json == {"ready": True}
    meta = client.get(f"/v2/models/{MODEL}").json
    assert meta["name"] == MODEL and meta["versions"] == ["1.0.0"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["probability", "label"]
    assert client.get(f"/v2/models/{MODEL}/versions/1.0.0").json == meta
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
    assert client.get(f"/v2/models/{MODEL}/versions/1.0.0/ready").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/other",
        "/v2/models/other/ready",
        f"/v2/models/{MODEL}/versions/9.9.9",
        f"/v2/models/{MODEL}/versions/9.9.9/ready",
    ],
)
def test_unknown_model_or_version_is_404(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "error" in r.json


def test_not_ready_is_a_4xx_with_the_reason(fake_tasks, client):
    fake_tasks.fail = "no worker"
    r = client.get("/v2/health/ready")  # readiness's own reason, as /readyz gives it
    assert r.status_code == 400 and r.json["error"] == "broker: not connected to the message broker"
    r = client.get(f"/v2/models/{MODEL}/ready")
    assert r.status_code == 400 and r.json["error"] == "model not ready: no worker has a loadable model"
    assert client.get(f"/v2/models/{MODEL}").status_code == 503
    assert client.post(INFER, json={"inputs": [_tensor(ROWS[:1], data=ROWS[0])]}).status_code == 503


def test_json_infer_flat_and_nested_give_the_same_as_api_v1(client):
    rows = ROWS[:5]
    v1 = client.post("/api/v1/predict", json={"rows": rows}).json["predictions"]
    flat = client.post(
        INFER, json={"id": "r1", "inputs": [_tensor(rows, data=[v for row in rows for v in row])]}
    ).json
    nested = client.post(INFER, json={"inputs": [_tensor(rows, "FP64", data=rows)]}).json
    assert flat["id"] == "r1" and flat["model_name"] == MODEL and flat["model_version"] == "1.0.0"
    for body in (flat, nested):
        out = {o["name"]: o for o in body["outputs"]}
        assert out["probability"]["shape"] == [5, 1] and out["label"]["datatype"] == "INT32"
        assert out["probability"]["data"] == pytest.approx([p["probability"] for p in v1], abs=1e-6)
        assert out["label"]["data"] == [p["label"] for p in v1]


def test_binary_in_and_out(client):
    body, headers = _binary_body(ROWS[:3], binary_data_output=True)
    r = client.post(INFER, data=body, headers=headers)
    assert r.status_code == 200 and r.mimetype == "application/octet-stream"
    length = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.data[:length])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [12, 12]
    probs = struct.unpack("<3f", r.data[length : length + 12])
    labels = struct.unpack("<3i", r.data[length + 12 :])
    v1 = client.post("/api/v1/predict", json={"rows": ROWS[:3]}).json["predictions"]
    assert list(probs) == pytest.approx([p["probability"] for p in v1], abs=1e-6)
    assert list(labels) == [p["label"] for p in v1]


def test_one_output_asked_binary_the_other_not_asked(client):
    r = client.post(
        INFER,
        json={
            "inputs": [_tensor(ROWS[:2], data=ROWS[:2])],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        },
    )
    length = int(r.headers["Inference-Header-Content-Length"])
    assert [o["name"] for o in json.loads(r.data[:length])["outputs"]] == ["label"]
    assert len(r.data) == length + 8


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"inputs": [_tensor(ROWS[:1], "INT64", data=ROWS[0])]}, "datatype must be FP32 or FP64"),
        ({"inputs": [{**_tensor(ROWS[:1], data=ROWS[0]), "shape": [1, 7]}]}, "shape must be [N, 8]"),
        (
            {"inputs": [{**_tensor(ROWS[:1], data=ROWS[0]), "shape": [2, 8]}]},
            "has 8 values; shape [2, 8] needs 16",
        ),
        ({"inputs": [{**_tensor(ROWS[:1], data=ROWS[0]), "name": "x"}]}, "one input 'input'"),
        ({"inputs": []}, "'inputs' must be a list"),
        ({"inputs": [_tensor(ROWS[:1])]}, "neither 'data' nor"),
        (
            {"inputs": [_tensor(ROWS[:1], data=[1, 2000, 1, 1, 1, 1, 1, 1])]},
            "data[0][1] (glucose) must be <= 1000",
        ),
        ({"inputs": [_tensor(ROWS[:1], data=[1, "x", 1, 1, 1, 1, 1, 1])]}, "must be a number"),
        ({"inputs": [_tensor(ROWS[:1], data=ROWS[0])], "outputs": [{"name": "score"}]}, "unknown output"),
        ({"inputs": [{**_tensor(ROWS[:1], data=ROWS[0]), "shape": [51, 8]}]}, "at most 50 per request"),
    ],
)
def test_bad_json_requests_are_400(client, request_body, message):
    r = client.post(INFER, json=request_body)
    assert r.status_code == 400, r.data
    assert message in r.json["error"]


def test_bad_binary_requests_are_400(client):
    body, headers = _binary_body(ROWS[:2])
    r = client.post(INFER, data=body[:-8], headers=headers)
    assert r.status_code == 400 and "bytes follow" in r.json["error"]
    r = client.post(INFER, data=body, headers={"Inference-Header-Content-Length": str(len(body) + 1)})
    assert r.status_code == 400
    bad = [list(ROWS[0]), [*ROWS[1][:7], float("nan")]]
    body, headers = _binary_body(bad, "FP32")
    r = client.post(INFER, data=body, headers=headers)
    assert r.status_code == 400 and "inputs[0][1][7] must be a finite number" in r.json["error"]


def test_infer_by_version(client, fake_tasks):
    ok = {"inputs": [_tensor(ROWS[:1], data=ROWS[0])]}
    assert client.post(f"/v2/models/{MODEL}/versions/1.0.0/infer", json=ok).status_code == 200
    r = client.post(f"/v2/models/{MODEL}/versions/2.0.0/infer", json=ok)
    assert r.status_code == 404 and "served version is '1.0.0'" in r.json["error"]
    assert client.post("/v2/models/other/infer", json=ok).status_code == 404


# --- the live stack: real RabbitMQ, Celery workers and gunicorn ---------------------------------


def _api_v1(url, rows):
    r = requests.post(f"{url}/api/v1/predict", json={"rows": rows}, timeout=15)
    r.raise_for_status()
    preds = r.json()["predictions"]
    return np.array([p["probability"] for p in preds]), np.array([p["label"] for p in preds])


@pytest.mark.integration
@requires_rabbitmq
def test_tritonclient(live_stack):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(
        url=f"127.0.0.1:{live_stack.port}", connection_timeout=15, network_timeout=15
    )
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata(MODEL)
    assert meta["versions"] == ["1.0.0"] and meta["inputs"][0]["shape"] == [-1, 8]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    want_p, want_l = _api_v1(live_stack.url, ROWS)
    for dtype, binary_in, binary_out in [
        ("FP32", True, True),
        ("FP64", False, False),
        ("FP64", True, False),
        ("FP32", False, True),
    ]:
        x = np.array(ROWS, dtype=np.float32 if dtype == "FP32" else np.float64)
        tensor = triton.InferInput("input", list(x.shape), dtype)
        tensor.set_data_from_numpy(x, binary_data=binary_in)
        outputs = [
            triton.InferRequestedOutput(name, binary_data=binary_out) for name in ("probability", "label")
        ]
        result = client.infer(MODEL, [tensor], outputs=outputs, model_version="1.0.0")
        assert result.as_numpy("probability").shape == (len(ROWS), 1)
        np.testing.assert_allclose(result.as_numpy("probability")[:, 0], want_p, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("label")[:, 0], want_l)
    # A wrong shape and a wrong datatype: the client raises its own exception with our message.
    for bad in (triton.InferInput("input", [4, 4], "FP32"), triton.InferInput("input", [2, 8], "INT32")):
        bad.set_data_from_numpy(
            np.ones(bad.shape(), dtype=np.float32 if bad.datatype() == "FP32" else np.int32)
        )
        with pytest.raises(InferenceServerException) as exc:
            client.infer(MODEL, [bad])
        assert exc.value.status() == "400"
        assert (
            "shape must be [N, 8]" in exc.value.message()
            or "datatype must be FP32 or FP64" in exc.value.message()
        )
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")
    client.close()


@pytest.mark.integration
@requires_rabbitmq
def test_kserve_rest_client(live_stack):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    want_p, want_l = _api_v1(live_stack.url, ROWS)

    def request(x, dtype, binary_in, binary_out, shape=None):
        tensor = InferInput("input", list(shape or x.shape), dtype)
        tensor.set_data_from_numpy(x, binary_data=binary_in)
        outputs = [
            RequestedOutput(n, parameters={"binary_data": binary_out}) for n in ("probability", "label")
        ]
        return InferRequest(MODEL, [tensor], request_outputs=outputs)

    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=15))
        try:
            assert await client.is_server_live(live_stack.url)
            assert await client.is_server_ready(live_stack.url)
            assert await client.is_model_ready(live_stack.url, MODEL)
            for dtype, binary_in, binary_out in [
                ("FP32", True, True),
                ("FP64", False, False),
                ("FP64", True, True),
            ]:
                x = np.array(ROWS, dtype=np.float32 if dtype == "FP32" else np.float64)
                result = await client.infer(
                    live_stack.url, request(x, dtype, binary_in, binary_out), model_name=MODEL
                )
                assert result.model_name == MODEL
                out = {o.name: o.as_numpy() for o in result.outputs}
                np.testing.assert_allclose(out["probability"].reshape(-1), want_p, atol=1e-6)
                np.testing.assert_array_equal(out["label"].reshape(-1), want_l)
            bad_shape = request(np.ones((4, 4), dtype=np.float32), "FP32", False, False)
            bad_type = request(np.ones((2, 8), dtype=np.int32), "INT32", True, False)
            for bad, message in (
                (bad_shape, "shape must be [N, 8]"),
                (bad_type, "datatype must be FP32 or FP64"),
            ):
                with pytest.raises(httpx.HTTPStatusError) as exc:
                    await client.infer(live_stack.url, bad, model_name=MODEL)
                assert exc.value.response.status_code == 400
                assert message in str(exc.value)
        finally:
            await client.close()

    asyncio.run(run())


@pytest.mark.integration
@requires_rabbitmq
def test_openapi_conformance_of_v2_with_schemathesis(live_stack):
    """Property-based: requests generated from the OpenAPI document of /v2, answers checked against it."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{live_stack.url}/api/v1/openapi.json")
    checks = [
        schemathesis.checks.not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    session = requests.Session()
    seen = defaultdict(set)
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path.startswith("/v2")]
    assert len(operations) == 9
    served = {"model_name": MODEL, "model_version": "1.0.0"}
    for operation in operations:
        # Requests that fit the document and requests that do not; half of them name the served model
        # and version, so their bodies reach the validation.
        modes = st.one_of(*(operation.as_strategy(mode) for mode in GenerationMode))

        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=modes, use_served=st.booleans())
        def check(case, use_served):
            if use_served and case.path_parameters:
                case.path_parameters = {k: served[k] for k in case.path_parameters}
            response = case.call_and_validate(
                base_url=live_stack.url, session=session, checks=checks, timeout=15
            )
            seen[case.operation.path].add(response.status_code)

        check()
    assert {400, 404} <= seen[INFER.replace(MODEL, "{model_name}")], seen
    assert {200, 404} <= seen["/v2/models/{model_name}"], seen


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        *[(1000.0, True), (0.0, True), (-0.0, True), (5e-45, True)],
        *[
            (1000.0001, False),
            (-1e-30, False),
            (float("nan"), False),
            (float("inf"), False),
            (float("-inf"), False),
        ],
    ],
)
def test_binary_range_check_agrees_with_the_json_path(client, datatype, value, accepted):
    """The fast check of binary inputs (bits as integers) against the row validator of /api/v1."""
    rows = [list(ROWS[0]), [*ROWS[1][:1], value, *ROWS[1][2:]], list(ROWS[2])]
    if datatype == "FP32":
        value = struct.unpack("<f", struct.pack("<f", value))[0]  # what the client's FP32 holds
    v1 = client.post("/api/v1/predict", json={"rows": [rows[0], [*rows[1][:1], value, *rows[1][2:]]]})
    body, headers = _binary_body(rows, datatype)
    r = client.post(INFER, data=body, headers=headers)
    assert (r.status_code == 200) is accepted is (v1.status_code == 200), (r.data, v1.data)
    if not accepted:
        assert r.json["error"].startswith("inputs[0][1][1]")


def test_packed_rows_travel_with_json_rows_in_one_task():
    from array import array

    from modelserve.wire import PackedRows, pack_batch, unpack_floats

    packed = PackedRows(array("f", [v for row in ROWS[:2] for v in row]))
    assert len(packed) == 2 and list(packed) == [list(np.float32(r).tolist()) for r in ROWS[:2]]
    values = unpack_floats(pack_batch([ROWS[2:3], packed, ROWS[3:4]]))
    assert values == pytest.approx([v for row in (ROWS[2], *ROWS[:2], ROWS[3]) for v in row], rel=1e-6)
    with pytest.raises(ValueError):
        PackedRows(array("f", [1.0] * 7))


def test_the_fast_range_check_takes_valid_rows_without_the_slow_path():
    from modelserve.oip import _in_range

    for fmt, width in (("f", 4), ("d", 8)):
        raw = memoryview(struct.pack(f"<{len(ROWS) * 8}{fmt}", *(v for row in ROWS for v in row)))
        assert _in_range(raw, width, len(ROWS))
        top = struct.pack(f"<8{fmt}", 30, 1000, 400, 200, 5000, 200, 10, 150)  # every maximum
        assert _in_range(memoryview(top), width, 1)
        assert not _in_range(memoryview(top[:-width] + struct.pack(f"<{fmt}", 150.5)), width, 1)


def test_property_no_request_makes_v2_infer_answer_5xx():
    """Requests near the valid ones (every field either right or anything JSON), JSON or binary:
    a 200 or a 4xx with an error, never a 5xx (task layer = test double)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from modelserve.web import create_app
    from ms_support import FakeTaskLayer, make_settings

    client = create_app(make_settings(MODELSERVE_MAX_BATCH_ROWS="20"), tasks=FakeTaskLayer()).test_client()
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    anything = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=12,
    )

    def field(right):
        return st.just(right) | anything

    rows = st.integers(0, 3)
    tensors = rows.flatmap(
        lambda n: st.fixed_dictionaries(
            {"name": field("input"), "datatype": field("FP32") | st.just("FP64"), "shape": field([n, 8])},
            optional={
                "data": field([1.0] * 8 * n) | st.just([[2.0] * 8] * n),
                "parameters": field({"binary_data_size": 32 * n}),
            },
        )
    )
    outputs = st.lists(
        st.fixed_dictionaries(
            {"name": field("label")}, optional={"parameters": field({"binary_data": True})}
        ),
        max_size=3,
    )
    headers = st.fixed_dictionaries(
        {"inputs": field([]) | st.lists(tensors, min_size=1, max_size=2)},
        optional={
            "outputs": field([]) | outputs,
            "parameters": field({"binary_data_output": True}),
            "id": anything,
        },
    )

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(header=headers, binary=st.binary(max_size=96), length_delta=st.none() | st.integers(-4, 4))
    def check(header, binary, length_delta):
        text = json.dumps(header).encode()
        extra = {}
        if length_delta is not None:  # the binary extension, with a right or wrong header length
            extra = {"Inference-Header-Content-Length": str(len(text) + length_delta)}
        r = client.post(INFER, data=text + (binary if length_delta is not None else b""), headers=extra)
        assert r.status_code < 500, (header, r.data)
        if r.status_code != 200:
            assert r.json["error"]

    check()


def test_the_model_name_is_a_setting(fake_tasks):
    from modelserve.web import create_app
    from ms_support import make_settings

    client = create_app(make_settings(MODELSERVE_MODEL_NAME="diabetes"), tasks=fake_tasks).test_client()
    assert client.get("/v2/models/diabetes").json["name"] == "diabetes"
    r = client.get(f"/v2/models/{MODEL}")
    assert r.status_code == 404 and "serves 'diabetes'" in r.json["error"]


@pytest.mark.parametrize(("fmt", "width", "floats"), [("f", 4, 32), ("d", 8, 64)])
def test_property_the_fast_range_check_agrees_with_the_bounds(fmt, width, floats):
    """Random rows, bounds and their neighbours included: the fast check accepts exactly the rows
    whose every value is in [0, its maximum] (-0.0 left to the slow path); a borrow between lanes
    would show as a disagreement."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from modelserve.features import FEATURE_RANGES, FEATURES
    from modelserve.oip import _in_range

    highs = [FEATURE_RANGES[name][1] for name in FEATURES]
    edges = [0.0, -0.0, 5e-45, *highs, *(np.nextafter(h, np.inf) for h in highs), float("nan"), -1.0]
    value = st.floats(width=floats) | st.sampled_from(edges)

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.lists(value, min_size=8, max_size=8), min_size=1, max_size=5))
    def check(rows):
        flat = [v for row in rows for v in row]
        raw = struct.pack(f"<{len(flat)}{fmt}", *flat)
        flat = struct.unpack(f"<{len(flat)}{fmt}", raw)  # as the request holds them
        exact = all(0 <= v <= highs[i % 8] for i, v in enumerate(flat))
        negative_zero = any(v == 0 and str(v).startswith("-") for v in flat)
        assert _in_range(memoryview(raw), width, len(rows)) == (exact and not negative_zero)

    check()
