"""Molecule scenarios state only what differs from the shared base config."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted(p.parent.name for p in (ROOT / "molecule").glob("*/molecule.yml"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_platforms_name_hosts_and_groups_only(scenario):
    # The container definition is playbooks/tasks/systemd_containers.yml, applied by the base
    # config's create (molecule/resources/create.yml): a scenario names its hosts, their groups and,
    # for emulated hosts, the platform.
    config = yaml.safe_load((ROOT / "molecule" / scenario / "molecule.yml").read_text())
    for platform in config.get("platforms") or []:
        extra = set(platform) - {"name", "groups", "platform"}
        assert not extra, f"molecule/{scenario}: {platform['name']} states {sorted(extra)}"


def test_base_config_creates_containers_from_the_shared_definition():
    base = yaml.safe_load((ROOT / ".config" / "molecule" / "config.yml").read_text())
    playbooks = base["provisioner"]["playbooks"]
    for step in ("create", "destroy"):
        path = (ROOT / "molecule" / "any-scenario" / playbooks[step]).resolve()
        assert "playbooks/tasks/systemd_containers.yml" in path.read_text(), path
    local = (ROOT / "playbooks" / "local_cluster.yml").read_text()
    assert "tasks/systemd_containers.yml" in local
    # Nothing else in the repository starts a systemd container its own way.
    for path in [
        *ROOT.glob("playbooks/*.yml"),
        *ROOT.glob("molecule/**/*.yml"),
        ROOT / ".config/molecule/config.yml",
    ]:
        assert "/lib/systemd/systemd" not in path.read_text(), path


def test_scripts_test_runs_every_scenario():
    # A scenario scripts/test does not list never runs in CI: it would pass by not running.
    listed = re.search(r"^scenarios_all=\(([^)]*)\)", (ROOT / "scripts" / "test").read_text(), re.M)
    assert listed, "scripts/test: no scenarios_all=(...) line"
    assert sorted(listed.group(1).split()) == SCENARIOS


def test_scripts_test_all_runs_every_scenario_and_stage():
    # `scripts/test` (what .ci/run runs) schedules jobs_all: every scenario, lint, pytest and the
    # local cluster; one missing would silently not run in CI.
    listed = re.search(r"^jobs_all=\(([^)]*)\)", (ROOT / "scripts" / "test").read_text(), re.M)
    assert listed, "scripts/test: no jobs_all=(...) line"
    jobs = listed.group(1).split()
    assert len(jobs) == len(set(jobs)), f"a job listed twice: {jobs}"
    assert sorted(jobs) == sorted([*SCENARIOS, "lint", "pytest", "local"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_proves_idempotence(scenario):
    # Either Molecule's idempotence step (the base sequence has it), or a verify test that re-runs
    # site.yml on the scenario's hosts and requires changed=0 on every host, or (molecule/cluster)
    # a side_effect that re-runs site.yml on every host under Ansible's junit callback with changed
    # tasks as failures, and a verify test that reads that report.
    base = yaml.safe_load((ROOT / ".config" / "molecule" / "config.yml").read_text())
    config = yaml.safe_load((ROOT / "molecule" / scenario / "molecule.yml").read_text())
    sequence = (config.get("scenario") or {}).get("test_sequence") or base["scenario"]["test_sequence"]
    if "idempotence" in sequence:
        return
    tests = "\n".join(p.read_text() for p in (ROOT / "molecule" / scenario / "tests").glob("test_*.py"))
    env = (config.get("provisioner") or {}).get("env") or {}
    if env.get("JUNIT_FAIL_ON_CHANGE") == "true" and "side_effect" in sequence:
        side_effect = (ROOT / "molecule" / scenario / "side_effect.yml").read_text()
        assert "site.yml" in side_effect, f"molecule/{scenario}: side_effect does not re-run site.yml"
        assert 'junit")' in tests and 'glob("side_effect-*.xml")' in tests, (
            f"molecule/{scenario}: no verify test reads side_effect's junit report"
        )
        return
    assert re.search(r'"site\.yml"\)?\]?,?[^\n]*\n(?:.*\n){0,12}.*" changed=0 " in line', tests), (
        f"molecule/{scenario}: no idempotence step and no verify test re-running site.yml for changed=0"
    )
