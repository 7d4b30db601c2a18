"""The monitoring role on its own: Prometheus and Alertmanager answer on the host's address, the
targets come from the inventory, every shipped rule file is loaded (with the `for:` override)."""

import json
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[3] / "roles" / "monitoring" / "files" / "rules"


@pytest.fixture(scope="module")
def address(host):
    return host.interface("eth0").addresses[0]


def get_json(host, url):
    return json.loads(host.check_output(f"curl -fsS --max-time 10 '{url}'"))


def test_services_run_on_the_cluster_address(host, address):
    for unit in ("prometheus", "prometheus-alertmanager"):
        assert host.service(unit).is_running and host.service(unit).is_enabled
    assert host.socket(f"tcp://{address}:9090").is_listening
    assert host.socket(f"tcp://{address}:9093").is_listening
    assert not host.socket("tcp://0.0.0.0:9090").is_listening


def test_targets_come_from_the_inventory(host, address):
    node = json.loads(host.file("/etc/prometheus/file_sd/node.json").content_string)
    assert node == [
        {
            "targets": ["monitoring-1:9100"],
            "labels": {"host": "monitoring-1", "group": "monitoring", "instance_number": "1"},
        }
    ]
    assert (
        json.loads(host.file("/etc/prometheus/file_sd/worker.json").content_string) == []
    )  # no workers here
    targets = get_json(host, f"http://{address}:9090/api/v1/targets")["data"]["activeTargets"]
    by_job = {}
    for t in targets:
        by_job.setdefault(t["labels"]["job"], []).append(t)
    assert [t["labels"]["host"] for t in by_job["node"]] == ["monitoring-1"]
    # Prometheus and Alertmanager scrape fine on their own (the node exporter is not installed here).
    for job in ("prometheus", "alertmanager"):
        for _ in range(30):
            states = [
                t["health"]
                for t in get_json(host, f"http://{address}:9090/api/v1/targets")["data"]["activeTargets"]
                if t["labels"]["job"] == job
            ]
            if states == ["up"]:
                break
            host.run("sleep 1")
        assert states == ["up"], job


def test_every_shipped_rule_file_is_loaded_with_the_for_override(host, address):
    shipped = {g["name"] for p in RULES.glob("*.rules.yml") for g in yaml.safe_load(p.read_text())["groups"]}
    groups = get_json(host, f"http://{address}:9090/api/v1/rules")["data"]["groups"]
    assert {g["name"] for g in groups} == shipped
    alerts = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
    assert alerts and all(r["duration"] == 5 for r in alerts)


def test_alertmanager_sends_to_the_webhook(host, address):
    status = get_json(host, f"http://{address}:9093/api/v2/status")
    assert "http://127.0.0.1:9/alerts" in status["config"]["original"]
    config = yaml.safe_load(host.file("/etc/prometheus/alertmanager.yml").content_string)
    assert config["route"]["receiver"] == "modelserve"
