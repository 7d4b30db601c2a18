"""The Grafana dashboards shipped in roles/monitoring/files/dashboards: valid JSON that Grafana
imports, and every metric an expression reads is one the cluster exports (the app's metrics, the
monitoring role's recording rules, the node exporter's and rabbitmq_prometheus' families, `up`)."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "roles" / "monitoring" / "files" / "dashboards").glob("*.json"))
RULES = ROOT / "roles" / "monitoring" / "files" / "rules"
METRICS_PY = ROOT / "app" / "src" / "modelserve" / "metrics.py"
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "delta", "deriv",
    "histogram_quantile", "predict_linear", "and", "or", "unless", "on", "ignoring", "le", "offset",
}  # fmt: skip
# Families of the exporters the collection runs (node exporter, rabbitmq_prometheus) and Prometheus'.
EXPORTER_PREFIXES = ("node_", "rabbitmq_")


def _app_metrics() -> set[str]:
    """Names the app registers (metrics.py), with the suffixes prometheus_client adds."""
    source = METRICS_PY.read_text()
    names = set(re.findall(r'"(modelserve_[a-z0-9_]+)"', source))
    names |= {"modelserve_worker_" + n for n in re.findall(r'name \+ "([a-z0-9_]+)"', source)}
    return {n + s for n in names for s in ("", "_bucket", "_count", "_sum", "_total")}


def _rules() -> list[dict]:
    """Every rule (recording and alerting) of the shipped rule files."""
    return [
        rule
        for path in RULES.glob("*.rules.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_ranges)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_groupings))
    return {w for w in words if w not in PROMQL_WORDS}


def test_there_is_a_dashboard():
    assert DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_importable_json(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert _exprs(dashboard), "no panel queries anything"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_reads_is_exported(path):
    known = _app_metrics() | _recorded() | {"up"}
    unknown = {
        name
        for expr in _exprs(json.loads(path.read_text()))
        for name in _metric_names(expr)
        if name not in known and not name.startswith(EXPORTER_PREFIXES)
    }
    assert not unknown, f"{path.name} reads metrics nobody exports: {sorted(unknown)}"


def test_the_metric_check_catches_a_typo():
    assert "modelserve_http_request_total" not in _app_metrics()  # the real one ends in _requests_total
    assert _metric_names('sum by (le) (rate(modelserve_x_bucket{a="b"}[5m]))') == {"modelserve_x_bucket"}


def test_every_alert_has_its_series_on_a_dashboard():
    # An operator paged by an alert finds what fired it on a panel: some series the alert reads
    # (a recording rule or a raw metric) is drawn by a dashboard, or is what a drawn rule records from.
    drawn = {n for path in DASHBOARDS for e in _exprs(json.loads(path.read_text())) for n in _metric_names(e)}
    recordings = {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}
    alerts = {rule["alert"]: rule["expr"] for rule in _rules() if "alert" in rule}
    drawn |= {n for name in drawn & recordings.keys() for n in _metric_names(recordings[name])}
    missing = {a: sorted(_metric_names(e)) for a, e in alerts.items() if not _metric_names(e) & drawn}
    assert not missing, f"alerts whose series no panel draws: {missing}"
