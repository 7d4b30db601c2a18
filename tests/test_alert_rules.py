"""The Prometheus rules shipped in roles/monitoring/files/rules: valid, and tested with promtool.

Every `*.rules.yml` there is checked (`promtool check rules`) and every `tests/*_test.yml` run
(`promtool test rules`); every alert must be exercised by an `alert_rule_test` of some test file.
promtool comes with Debian's `prometheus` package (`scripts/bootstrap --test` installs it).
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parent.parent / "roles" / "monitoring" / "files" / "rules"
RULE_FILES = sorted(RULES.glob("*.rules.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*_test.yml"))


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    # Not a skip: without promtool the rules would go untested (scripts/bootstrap --test installs it).
    assert path, "promtool not found: apt-get install prometheus (scripts/bootstrap --test does)"
    return path


def _run(promtool, *args, cwd=RULES):
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_there_are_rules_and_tests():
    assert RULE_FILES and TEST_FILES


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_is_valid(promtool, path):
    res = _run(promtool, "check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_rule_unit_tests_pass(promtool, path):
    res = _run(promtool, "test", "rules", path.name, cwd=path.parent)
    assert res.returncode == 0, res.stdout + res.stderr


def _alerts(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    return {rule["alert"] for group in doc["groups"] for rule in group["rules"] if "alert" in rule}


def test_every_alert_is_unit_tested():
    tested = {
        case["alertname"]
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a test that expects it to fire, not only one that it stays quiet
    }
    shipped = set().union(*(_alerts(p) for p in RULE_FILES))
    assert shipped - tested == set(), f"alerts no promtool test makes fire: {sorted(shipped - tested)}"


def test_every_rule_file_is_loaded_by_some_test():
    loaded = {
        (path.parent / rule_file).resolve()
        for path in TEST_FILES
        for rule_file in yaml.safe_load(path.read_text())["rule_files"]
    }
    assert {p.resolve() for p in RULE_FILES} <= loaded


def test_a_broken_rule_or_a_wrong_expectation_fails(promtool, tmp_path):
    # The checks above can fail: a syntax error and an unmet expectation are both reported.
    bad = tmp_path / "bad.rules.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: up ==\n")
    assert _run(promtool, "check", "rules", str(bad)).returncode != 0
    good = tmp_path / "good.rules.yml"
    good.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: up == 0\n")
    test = tmp_path / "x_test.yml"
    test.write_text(
        yaml.safe_dump(
            {
                "rule_files": ["good.rules.yml"],
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [{"series": 'up{job="a"}', "values": "1 1 1"}],
                        "alert_rule_test": [{"eval_time": "2m", "alertname": "X", "exp_alerts": [{}]}],
                    }
                ],
            }
        )
    )
    assert _run(promtool, "test", "rules", test.name, cwd=tmp_path).returncode != 0
