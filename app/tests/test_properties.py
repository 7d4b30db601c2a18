"""Property: no request body, however odd, makes the API answer 5xx (task layer = test double)."""

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelserve.features import FEATURE_RANGES, FEATURES
from modelserve.web import create_app
from ms_support import FakeTaskLayer, make_settings

APP = create_app(make_settings(MODELSERVE_MAX_BATCH_ROWS="20"), tasks=FakeTaskLayer())
CLIENT = APP.test_client()

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
numbers = st.integers(-(10**20), 10**20) | st.floats(allow_nan=True, allow_infinity=True)
list_rows = st.lists(numbers | scalars, min_size=0, max_size=10)
obj_rows = st.dictionaries(st.sampled_from([*FEATURES, "foo"]), numbers | scalars, max_size=10)
rows = st.lists(list_rows | obj_rows | json_values, min_size=0, max_size=25)
bodies = (
    st.builds(lambda r: {"rows": r}, rows)
    | st.builds(lambda r: {"instances": r}, rows)
    | st.builds(lambda r: {"row": r}, list_rows | obj_rows)
    | json_values
)
valid_rows = st.lists(
    st.tuples(*(st.floats(lo, hi, allow_nan=False) for lo, hi in FEATURE_RANGES.values())).map(list),
    min_size=1,
    max_size=20,
)


def _post(data: bytes):
    return CLIENT.post("/api/v1/predict", data=data, content_type="application/json")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_arbitrary_json_never_5xx(body):
    r = _post(json.dumps(body, allow_nan=True).encode())
    assert r.status_code < 500, r.get_data(as_text=True)
    assert r.is_json
    if r.status_code != 200:
        assert r.json["error"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_5xx(raw):
    r = _post(raw)
    assert r.status_code < 500
    assert r.is_json


@settings(max_examples=200, deadline=None)
@given(valid_rows)
def test_valid_rows_always_predicted_one_per_row(rs):
    r = _post(json.dumps({"rows": rs}).encode())
    assert r.status_code == 200, r.json
    preds = r.json["predictions"]
    assert len(preds) == len(rs)
    for p in preds:
        assert 0.0 <= p["probability"] <= 1.0 and not math.isnan(p["probability"])
        assert p["label"] in (0, 1)
