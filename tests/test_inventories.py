"""The environments' inventories: structure, and the group_vars precedence trap."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENVS = ["local", "dev", "svt", "prod"]


def _keys(directory: Path) -> dict[str, Path]:
    keys = {}
    for path in sorted(directory.rglob("*.yml")):
        data = yaml.safe_load(path.read_text()) or {}
        for key in data:
            keys[key] = path
    return keys


@pytest.mark.parametrize("env", ENVS)
def test_no_variable_defined_both_next_to_site_and_in_inventory(env):
    # group_vars/ beside site.yml outrank inventory group_vars: a variable in both would silently
    # ignore the environment's value.
    top = _keys(ROOT / "group_vars")
    inv = _keys(ROOT / "inventories" / env / "group_vars")
    both = sorted(set(top) & set(inv))
    assert not both, f"defined in group_vars/ and inventories/{env}/group_vars/: {both}"


@pytest.mark.parametrize("env", ENVS)
def test_inventory_groups_say_what_hosts_do(env, ansible_bin, ansible_env):
    out = subprocess.run(
        [ansible_bin / "ansible-inventory", "-i", f"inventories/{env}", "--list"],
        cwd=ROOT,
        env=ansible_env,
        capture_output=True,
        text=True,
        check=True,
    )
    inv = json.loads(out.stdout)
    assert set(inv["serving"]["children"]) == {"broker", "frontend", "workers"}
    for group in ("broker", "frontend", "workers"):
        assert inv[group]["hosts"], f"{env}: group {group} has no host"
    assert len(inv["broker"]["hosts"]) >= 1
    assert "development" in inv["all"]["children"]
    assert "edge" in inv["all"]["children"] or "edge" in inv


@pytest.mark.parametrize("env", ENVS)
def test_every_environment_declares_its_addresses(env):
    keys = _keys(ROOT / "inventories" / env / "group_vars")
    for needed in (
        "modelserve_environment",
        "modelserve_provision",
        "modelserve_cluster_address",
        "modelserve_cluster_cidrs",
    ):
        assert needed in keys, f"inventories/{env} does not set {needed}"


def test_no_real_vault_file_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    assert not [p for p in tracked.splitlines() if p.endswith("vault.yml")]
