"""Web endpoints other than predict-validation, against the Flask test client with a task double."""

import re

from modelserve.web import create_app, gunicorn_argv
from ms_support import FakeTaskLayer, make_settings


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json == {
        "ready": True,
        "checks": {"broker": True, "worker": True, "model": True},
        "consumers": 1,
        "model_version": "1.0.0",
    }


def test_readyz_is_cached(fake_tasks):
    app = create_app(make_settings(MODELSERVE_READY_CACHE_SECONDS="60"), tasks=fake_tasks)
    c = app.test_client()
    for _ in range(5):
        assert c.get("/readyz").status_code == 200
    assert sum(1 for name, _ in fake_tasks.calls if name == "consumers") == 1
    assert not [name for name, _ in fake_tasks.calls if name == "modelserve.model_info"]  # asks no worker


class Fleet(FakeTaskLayer):
    """Workers that reported a status: (id, version or None, reason)."""

    def __init__(self, workers, consumers):
        super().__init__()
        self.workers, self.n = workers, consumers

    def consumers(self, wait=0.0):
        return self.n

    def fleet(self, wait=0.0):
        return [
            {"worker": w, "state": "serving" if v else "no_model", "version": v, "reason": why, "ttl": 7.0}
            | ({"loaded_at": f"2026-01-01T00:00:0{i}", "metrics": {"auc": i}} if v else {})
            for i, (w, v, why) in enumerate(self.workers)
        ]


def test_readyz_means_a_worker_consumes_the_queue():
    broken = ("h2:2", None, "release 1.0.0 cannot be loaded: checksum mismatch")
    c = create_app(make_settings(), tasks=Fleet([broken], consumers=0)).test_client()
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json["checks"] == {"broker": True, "worker": False, "model": False}
    assert r.json["reasons"] == ["worker: no worker with a loadable model consumes the prediction queue"]
    c = create_app(make_settings(), tasks=Fleet([("h1:1", "1.0.0", None), broken], 1)).test_client()
    assert [c.get("/readyz").status_code for _ in range(5)] == [200] * 5


def test_model_endpoint_reports_the_fleet():
    workers = [("h1:1", "1.0.0", None), ("h1:2", "1.1.0", None), ("h2:1", "1.1.0", None)]
    broken = ("h2:2", None, "release 1.1.0 cannot be loaded: checksum mismatch")
    c = create_app(make_settings(), tasks=Fleet([*workers, broken], 3)).test_client()
    r = c.get("/api/v1/model")
    assert r.status_code == 200
    assert r.json["version"] == "1.1.0" and r.json["versions"] == {"1.0.0": 1, "1.1.0": 2}
    assert r.json["metrics"] == {"auc": 2} and r.json["loaded"] is True  # the last 1.1.0 loaded
    assert [(w["worker"], w["state"], w["reason"]) for w in r.json["workers"]] == [
        ("h1:1", "serving", None),
        ("h1:2", "serving", None),
        ("h2:1", "serving", None),
        ("h2:2", "no_model", broken[2]),
    ]
    c = create_app(make_settings(), tasks=Fleet([broken], 0)).test_client()
    r = c.get("/api/v1/model")
    assert r.status_code == 503 and r.json["workers"][0]["reason"] == broken[2]


def test_model_endpoint(client):
    r = client.get("/api/v1/model")
    assert r.status_code == 200
    assert r.json["version"] == "1.0.0"
    assert "loaded_at" in r.json and "metrics" in r.json


def test_predictions_name_the_model_version_in_a_header_and_the_metrics():
    # During a canary some workers answer with another version: each answer says which.
    for version in ("1.0.0", "1.1.0"):
        c = create_app(make_settings(), tasks=FakeTaskLayer(version=version)).test_client()
        r = c.post("/api/v1/predict", json={"rows": [[1, 2, 3, 4, 5, 6, 0.1, 8]] * 2})
        assert r.status_code == 200
        assert r.headers["X-Model-Version"] == r.json["model_version"] == version
        metrics = c.get("/metrics").get_data(as_text=True)
        assert re.search(
            rf'modelserve_predictions_total\{{model_version="{re.escape(version)}"[^}}]*\}} 2', metrics
        )
    r = c.post("/api/v1/predict", json={"rows": []})  # refused: no model answered, no header
    assert r.status_code == 422 and "X-Model-Version" not in r.headers


def test_openapi_document(client):
    r = client.get("/api/v1/openapi.json")
    assert r.status_code == 200
    doc = r.json
    assert doc["openapi"].startswith("3.")
    for path in ("/api/v1/predict", "/api/v1/model", "/healthz", "/readyz", "/metrics"):
        assert path in doc["paths"]
    answers = set(doc["paths"]["/api/v1/predict"]["post"]["responses"])
    assert answers >= {"200", "400", "413", "415", "422", "503"}


def test_metrics_are_not_served_on_the_http_port_when_they_have_their_own(fake_tasks):
    # The gunicorn master serves them on MODELSERVE_WEB_METRICS_PORT (gunicorn_hooks); the clients'
    # port answers 404, as for any unknown path.
    c = create_app(make_settings(MODELSERVE_WEB_METRICS_PORT="9800"), tasks=fake_tasks).test_client()
    assert c.get("/healthz").status_code == 200
    r = c.get("/metrics")
    assert r.status_code == 404 and "modelserve_" not in r.get_data(as_text=True)


def test_metrics_count_requests_and_latency(client):
    client.post("/api/v1/predict", json={"rows": [[1, 2, 3, 4, 5, 6, 0.1, 8]]})
    client.post("/api/v1/predict", json={"rows": []})
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(
        r'modelserve_http_requests_total\{endpoint="/api/v1/predict",'
        r'method="POST",status="200"\} 1\.0$',
        text,
        re.M,
    )
    assert re.search(r'status="422"\} 1\.0$', text, re.M)
    assert re.search(
        r'^modelserve_http_request_duration_seconds_count\{endpoint="/api/v1/predict"\} 2\.0$', text, re.M
    )
    assert "pid=" not in text  # one view of every process, not one series per process
    assert 'le="+Inf"' in text
    assert "# TYPE modelserve_queue_roundtrip_seconds histogram" in text


def test_index_page_is_self_contained(client):
    html = client.get("/").get_data(as_text=True)
    assert '<form id="patient"' in html and 'id="chart"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no CDN, no external assets
    js = client.get("/static/app.js")
    assert js.status_code == 200 and 'fetch("/api/v1/predict"' in js.get_data(as_text=True)
    css = client.get("/static/app.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    # The CSP allows no inline script or style: the page must not need any.
    assert "<style" not in html and "style=" not in html and not re.search(r"<script(?! src=)", html)


def test_every_response_carries_the_security_headers_and_a_request_id(client):
    for r in (client.get("/"), client.get("/nope"), client.post("/api/v1/predict", json={"rows": []})):
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Referrer-Policy"] == "no-referrer"
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
    assert r.json["request_id"] == r.headers["X-Request-Id"]  # error bodies quote it
    ids = {client.get("/healthz").headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3
    # a proxy's well-formed id is kept (log correlation); anything else is replaced
    assert client.get("/healthz", headers={"X-Request-Id": "lb-123.a"}).headers["X-Request-Id"] == "lb-123.a"
    replaced = client.get("/healthz", headers={"X-Request-Id": "a b;<x>" + "y" * 80}).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)


def test_json_endpoints_refuse_other_content_types_with_415(client):
    body = '{"row": [1, 2, 3, 4, 5, 6, 0.1, 8]}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "text/html", None):
        r = client.post("/api/v1/predict", data=body, content_type=ctype)
        assert r.status_code == 415, (ctype, r.status_code)
        assert "application/json" in r.json["error"] and r.json["request_id"]
    assert (
        client.post("/api/v1/predict", data=body, content_type="application/json; charset=utf-8").status_code
        == 200
    )


def test_errors_name_no_host_process_or_path(caplog):
    secret = "ConnectionRefusedError: broker-7.internal:5672 pid 4242 /srv/modelserve/releases"
    c = create_app(make_settings(), tasks=FakeTaskLayer(fail=secret)).test_client()
    r = c.post("/api/v1/predict", json={"row": [1, 2, 3, 4, 5, 6, 0.1, 8]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    text = r.get_data(as_text=True)
    for leak in ("broker-7", "5672", "4242", "/srv", "Refused"):
        assert leak not in text
    assert set(r.json) == {"error", "request_id"}
    # ... the operator finds them in the log under the request id the client quotes
    assert any(r.json["request_id"] in m and "broker-7" in m for m in caplog.messages)
    r = c.get("/readyz")
    assert r.status_code == 503 and "broker-7" not in r.get_data(as_text=True)


def test_metric_labels_are_a_closed_set(client):
    """Any method string a client sends becomes 'other': series, and memory, stay bounded."""

    def series() -> int:
        text = client.get("/metrics").get_data(as_text=True)
        return sum(1 for line in text.splitlines() if line.startswith("modelserve_http_requests_total{"))

    client.open("/api/v1/predict", method="FOO")
    client.open("/no/such/path", method="BAR")
    series()  # counts the /metrics request too
    before = series()
    for i in range(300):
        client.open("/api/v1/predict", method=f"FOO{i}")
        client.open(f"/no/such/path/{i}", method=f"BAR{i}")
    text = client.get("/metrics").get_data(as_text=True)
    assert series() == before
    assert "FOO" not in text and "BAR" not in text and "/no/such" not in text
    assert re.search(r'endpoint="unmatched",method="other",status="\d+"', text)


def test_gunicorn_command_line():
    argv = gunicorn_argv(make_settings(MODELSERVE_BIND="127.0.0.1:9999", MODELSERVE_WEB_WORKERS="3"), [])
    assert argv[1:3] == ["-m", "gunicorn"]
    assert argv[argv.index("--bind") + 1] == "127.0.0.1:9999"
    assert argv[argv.index("--workers") + 1] == "3"
    assert argv[argv.index("--worker-class") + 1] == "gthread"
    assert argv[-1] == "modelserve.web:create_app()"
