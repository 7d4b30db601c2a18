from pathlib import Path

import pytest
from modelserve.config import ConfigError, load_settings, mask_url, parse_env_file

URL = "amqp://svc:s3cret@broker.internal:5672/modelserve"


def test_defaults_need_only_the_broker():
    s = load_settings({"MODELSERVE_BROKER_URL": URL})
    assert s.broker_url == URL
    assert s.model_dir == Path("/srv/modelserve")
    assert s.bind == "127.0.0.1:8080"
    assert s.max_batch_rows == 1000
    assert s.task_queue == "modelserve.predict"
    assert s.access_log is False


def test_broker_url_is_required_and_has_no_default():
    with pytest.raises(ConfigError, match="MODELSERVE_BROKER_URL"):
        load_settings({})
    assert load_settings({}, require_broker=False).broker_url == ""


def test_broker_url_must_be_amqp():
    with pytest.raises(ConfigError, match="amqp://"):
        load_settings({"MODELSERVE_BROKER_URL": "redis://localhost"})


def test_file_then_environment_wins(tmp_path):
    cfg = tmp_path / "modelserve.env"
    cfg.write_text(
        "# comment\n"
        f"MODELSERVE_BROKER_URL='{URL}'\n"
        "export MODELSERVE_BIND=0.0.0.0:9000\n"
        "MODELSERVE_WEB_WORKERS=3  # inline comment\n"
        "\n"
        'MODELSERVE_MODEL_DIR="/opt/models"\n'
        "MODELSERVE_MAX_BATCH_ROWS=10\n"
    )
    s = load_settings({"MODELSERVE_CONFIG": str(cfg), "MODELSERVE_MAX_BATCH_ROWS": "20"})
    assert s.broker_url == URL
    assert s.bind == "0.0.0.0:9000"
    assert s.web_workers == 3
    assert s.model_dir == Path("/opt/models")
    assert s.max_batch_rows == 20  # environment overrides the file


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="MODELSERVE_CONFIG"):
        load_settings({"MODELSERVE_CONFIG": str(tmp_path / "nope.env")})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MODELSERVE_WEB_WORKERS", "two"),
        ("MODELSERVE_WEB_WORKERS", "0"),
        ("MODELSERVE_TASK_TIMEOUT", "-1"),
        ("MODELSERVE_TASK_TIMEOUT", "nan"),
        ("MODELSERVE_ACCESS_LOG", "maybe"),
        ("MODELSERVE_WORKER_POOL", "gevent"),
        ("MODELSERVE_WORKER_POOL", "solo"),
        ("MODELSERVE_TASK_QUEUE_TYPE", "stream"),
        ("MODELSERVE_TASK_DELIVERY_LIMIT", "0"),
        ("MODELSERVE_BROKER_HEARTBEAT", "-1"),
        ("MODELSERVE_WORKER_REMOTE_CONTROL", "sometimes"),
        ("MODELSERVE_WORKER_METRICS_PORT", "-1"),
        ("MODELSERVE_WORKER_METRICS_PORT", "65536"),
        ("MODELSERVE_WORKER_INSTANCE", "0"),
        ("MODELSERVE_WEB_METRICS_PORT", "-1"),
        ("MODELSERVE_WEB_METRICS_PORT", "65536"),
        ("MODELSERVE_WEB_METRICS_PORT", "http"),
    ],
)
def test_malformed_values_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        load_settings({"MODELSERVE_BROKER_URL": URL, key: value})


def test_worker_metrics_bind_per_instance():
    s = load_settings({"MODELSERVE_BROKER_URL": URL})
    assert s.worker_metrics_bind == ("127.0.0.1", 9810)  # loopback unless told otherwise
    s = load_settings(
        {
            "MODELSERVE_BROKER_URL": URL,
            "MODELSERVE_WORKER_METRICS_ADDRESS": "10.0.0.5",
            "MODELSERVE_WORKER_METRICS_PORT": "9900",
            "MODELSERVE_WORKER_INSTANCE": "3",
        }
    )
    assert s.worker_metrics_bind == ("10.0.0.5", 9902)  # instance i on port + i - 1
    off = load_settings({"MODELSERVE_BROKER_URL": URL, "MODELSERVE_WORKER_METRICS_PORT": "0"})
    assert off.worker_metrics_bind is None


def test_web_metrics_port_is_off_unless_set():
    s = load_settings({"MODELSERVE_BROKER_URL": URL})
    assert (s.web_metrics_address, s.web_metrics_port) == ("127.0.0.1", 0)  # /metrics on the HTTP port
    s = load_settings(
        {
            "MODELSERVE_BROKER_URL": URL,
            "MODELSERVE_WEB_METRICS_PORT": "9800",
            "MODELSERVE_WEB_METRICS_ADDRESS": "10.0.0.5",
        }
    )
    assert (s.web_metrics_address, s.web_metrics_port) == ("10.0.0.5", 9800)


def test_env_file_syntax_errors_name_the_line():
    with pytest.raises(ConfigError, match=":2:"):
        parse_env_file("A=1\nthis is not an assignment\n", "x.env")


def test_describe_masks_the_password():
    s = load_settings({"MODELSERVE_BROKER_URL": URL})
    assert "s3cret" not in str(s.describe())
    assert mask_url(URL) == "amqp://svc:***@broker.internal:5672/modelserve"


def test_broker_settings_defaults():
    s = load_settings({"MODELSERVE_BROKER_URL": URL})
    assert s.broker_urls == [URL]
    assert s.task_queue_type == "quorum"
    assert s.task_delivery_limit == 5
    assert s.broker_heartbeat == 10.0
    assert s.worker_remote_control is False


def test_every_broker_node_is_listed_and_masked():
    second = URL.replace("broker.internal", "broker-2.internal")
    s = load_settings({"MODELSERVE_BROKER_URL": f" {URL} ;{second};"})
    assert s.broker_urls == [URL, second]
    assert s.broker_url == f"{URL};{second}"  # what Celery's broker_url takes
    assert "s3cret" not in str(s.describe())
    with pytest.raises(ConfigError, match="amqp://"):
        load_settings({"MODELSERVE_BROKER_URL": f"{URL};redis://localhost"})


def test_the_celery_app_follows_the_broker_settings():
    from modelserve.worker import create_celery_app

    second = URL.replace("broker.internal", "broker-2.internal")
    app = create_celery_app(load_settings({"MODELSERVE_BROKER_URL": f"{URL};{second}"}))
    assert app.conf.broker_url == f"{URL};{second}"
    assert app.conf.broker_heartbeat == 10.0
    assert app.conf.worker_enable_remote_control is False
    (queue,) = app.conf.task_queues
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "modelserve.predict.dead",
    }
    on = {
        "MODELSERVE_BROKER_URL": URL,
        "MODELSERVE_WORKER_REMOTE_CONTROL": "1",
        "MODELSERVE_TASK_QUEUE_TYPE": "classic",
    }
    app = create_celery_app(load_settings(on))
    assert app.conf.worker_enable_remote_control is True
    assert not app.conf.task_queues[0].queue_arguments  # the classic queue of before: no arguments


TLS_URL = "amqps://svc:s3cret@10.0.0.5:5671/modelserve;amqps://svc:s3cret@10.0.0.6:5671/modelserve"


def test_amqps_needs_the_ca_and_all_nodes_alike():
    with pytest.raises(ConfigError, match="MODELSERVE_BROKER_TLS_CA"):
        load_settings({"MODELSERVE_BROKER_URL": TLS_URL})
    mixed = TLS_URL.split(";")[0] + ";" + URL
    with pytest.raises(ConfigError, match="every broker node or for none"):
        load_settings({"MODELSERVE_BROKER_URL": mixed, "MODELSERVE_BROKER_TLS_CA": "/ca.pem"})
    with pytest.raises(ConfigError, match="set together"):
        env = {"MODELSERVE_BROKER_URL": TLS_URL, "MODELSERVE_BROKER_TLS_CA": "/ca.pem"}
        load_settings({**env, "MODELSERVE_BROKER_TLS_CERT": "/c"})
    assert load_settings({"MODELSERVE_BROKER_URL": URL}).broker_ssl() is False


def test_tls_options_check_each_nodes_name():
    """kombu writes the node it connects to into the options (pyamqp.Transport.establish_connection):
    the next connection, to another node, must be checked against that node's name, not the first's."""
    import ssl

    from kombu.transport.pyamqp import Transport

    env = {
        "MODELSERVE_BROKER_URL": TLS_URL,
        "MODELSERVE_BROKER_TLS_CA": "/etc/modelserve/tls/broker-ca.pem",
        "MODELSERVE_BROKER_TLS_CERT": "/etc/modelserve/tls/broker-client.pem",
        "MODELSERVE_BROKER_TLS_KEY": "/etc/modelserve/tls/broker-client.key.pem",
    }
    options = load_settings(env).broker_ssl()
    assert dict(options) == {
        "ca_certs": env["MODELSERVE_BROKER_TLS_CA"],
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,
        "certfile": env["MODELSERVE_BROKER_TLS_CERT"],
        "keyfile": env["MODELSERVE_BROKER_TLS_KEY"],
    }
    seen = []

    class Recorder:
        def __init__(self, **opts):
            seen.append(dict(**opts["ssl"])["server_hostname"])
            raise ConnectionRefusedError  # stop before any network

    from kombu import Connection

    for host in ("10.0.0.5", "10.0.0.6"):
        conn = Connection(f"amqps://svc:pw@{host}:5671/modelserve", ssl=options)
        transport = Transport(conn)
        transport.Connection = Recorder
        with pytest.raises(ConnectionRefusedError):
            transport.establish_connection()
    assert seen == ["10.0.0.5", "10.0.0.6"]
