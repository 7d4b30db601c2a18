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
        "model_version": "1.0.0",
    }


def test_readyz_is_cached(fake_tasks):
    app = create_app(make_settings(MODELSERVE_READY_CACHE_SECONDS="60"), tasks=fake_tasks)
    c = app.test_client()
    for _ in range(5):
        assert c.get("/readyz").status_code == 200
    assert sum(1 for name, _ in fake_tasks.calls if name == "modelserve.model_info") == 1


def test_readyz_reports_a_worker_without_model():
    class NoModel(FakeTaskLayer):
        def call(self, task, args, timeout=None):
            return {"loaded": False, "error": "no loadable release", "worker": "w1"}

    c = create_app(make_settings(), tasks=NoModel()).test_client()
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json["checks"] == {"broker": True, "worker": True, "model": False}
    assert "no loadable release" in r.json["reasons"][0]


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
    assert set(doc["paths"]["/api/v1/predict"]["post"]["responses"]) >= {"200", "400", "413", "422", "503"}


def test_metrics_count_requests_and_latency(client):
    client.post("/api/v1/predict", json={"rows": [[1, 2, 3, 4, 5, 6, 0.1, 8]]})
    client.post("/api/v1/predict", json={"rows": []})
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(
        r'modelserve_http_requests_total\{endpoint="/api/v1/predict",'
        r'method="POST",status="200",pid="\d+"\} 1',
        text,
    )
    assert re.search(r'status="422",pid="\d+"\} 1', text)
    assert re.search(
        r'modelserve_http_request_duration_seconds_count\{endpoint="/api/v1/predict",pid="\d+"\} 2', text
    )
    assert 'le="+Inf"' in text
    assert "# TYPE modelserve_queue_roundtrip_seconds histogram" in text


def test_index_page_is_self_contained(client):
    html = client.get("/").get_data(as_text=True)
    assert '<form id="patient"' in html and 'id="chart"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no CDN, no external assets
    js = client.get("/static/app.js")
    assert js.status_code == 200 and 'fetch("/api/v1/predict"' in js.get_data(as_text=True)


def test_gunicorn_command_line():
    argv = gunicorn_argv(make_settings(MODELSERVE_BIND="127.0.0.1:9999", MODELSERVE_WEB_WORKERS="3"), [])
    assert argv[1:3] == ["-m", "gunicorn"]
    assert argv[argv.index("--bind") + 1] == "127.0.0.1:9999"
    assert argv[argv.index("--workers") + 1] == "3"
    assert argv[argv.index("--worker-class") + 1] == "gthread"
    assert argv[-1] == "modelserve.web:create_app()"
