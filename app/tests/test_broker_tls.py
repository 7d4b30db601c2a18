"""The app over AMQP with TLS, against a real RabbitMQ TLS listener with verify_peer and
fail_if_no_peer_cert (what the rabbitmq role serves): web and worker connect with the CA, the
client certificate and a name check; without a client certificate, or with another CA, no connection."""

import pytest
import requests
from kombu import Connection
from modelserve.config import load_settings
from ms_devstack import make_tls

ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]


def _connect(rabbitmq, **env):
    settings = load_settings({"MODELSERVE_BROKER_URL": rabbitmq.url_for("web", tls=True), **env})
    conn = Connection(settings.broker_url, connect_timeout=5, ssl=settings.broker_ssl())
    try:
        conn.connect()
    finally:
        conn.release()


def test_web_and_worker_predict_over_tls(make_stack, rabbitmq):
    stack = make_stack(broker_urls=rabbitmq.urls(tls=True), **rabbitmq.tls_env())
    stack.wait_ready(60)
    r = requests.post(f"{stack.url}/api/v1/predict", json={"row": ROW}, timeout=15)
    assert r.status_code == 200, r.text


def test_client_certificate_and_ca_are_required(rabbitmq, tmp_path):
    _connect(rabbitmq, **rabbitmq.tls_env())  # the reference: this one connects
    with pytest.raises(Exception) as refused:
        _connect(rabbitmq, **rabbitmq.tls_env(client_cert=False))
    assert "certificate" in str(refused.value).lower() or isinstance(refused.value, OSError)
    # A broker certificate from another CA is not trusted.
    other_ca = make_tls(tmp_path / "other")["ca"]
    with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
        _connect(rabbitmq, **{**rabbitmq.tls_env(), "MODELSERVE_BROKER_TLS_CA": other_ca})
