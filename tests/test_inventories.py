"""The environments' inventories: structure, and that what they set takes effect."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import INVENTORIES, run_playbook
from test_playbooks import role_inputs_set_by_plays, role_vars_set_by_plays

ROOT = Path(__file__).resolve().parent.parent
ENVS = INVENTORIES
ROLE_INPUTS = role_inputs_set_by_plays()
WIRED = ["model_serving_http_port", "rabbitmq_amqp_port", "common_firewall_rules_by_group"]


def _keys(directory: Path) -> dict[str, Path]:
    keys = {}
    for path in sorted(directory.rglob("*.yml")):
        data = yaml.safe_load(path.read_text()) or {}
        for key in data:
            keys[key] = path
    return keys


def _inventory_hosts_vars(node) -> set[str]:
    """Variable names set inline in a hosts.yml / Molecule inventory tree (group `vars`, host entries)."""
    names = set()
    if isinstance(node, dict):
        names |= set(node.get("vars") or {})
        for host in (node.get("hosts") or {}).values():
            names |= set(host or {})
        for child in (node.get("children") or {}).values():
            names |= _inventory_hosts_vars(child)
    return names


def _inventory_variables() -> dict[str, dict[str, str]]:
    """Inventory (environment or Molecule scenario running the plays) -> variable -> where it is set."""
    found = {}
    for env in ENVS:
        where = found.setdefault(f"inventories/{env}", {})
        for sub in ("group_vars", "host_vars"):
            for name, path in _keys(ROOT / "inventories" / env / sub).items():
                where[name] = str(path.relative_to(ROOT))
        hosts = yaml.safe_load((ROOT / "inventories" / env / "hosts.yml").read_text())
        for name in _inventory_hosts_vars(hosts.get("all", {})):
            where[name] = f"inventories/{env}/hosts.yml"
    for scenario in sorted((ROOT / "molecule").glob("*/molecule.yml")):
        converge = (scenario.parent / "converge.yml").read_text()
        if "site.yml" not in converge and "playbooks/" not in converge:
            continue  # a role's own scenario sets role inputs directly, not through the plays
        inventory = (yaml.safe_load(scenario.read_text()).get("provisioner") or {}).get("inventory") or {}
        where = found.setdefault(str(scenario.relative_to(ROOT)), {})
        for sub in ("group_vars", "host_vars"):
            for entity_vars in (inventory.get(sub) or {}).values():
                where.update(dict.fromkeys(entity_vars, str(scenario.relative_to(ROOT))))
        for name in _inventory_hosts_vars((inventory.get("hosts") or {}).get("all", {})):
            where[name] = str(scenario.relative_to(ROOT))
    return found


@pytest.mark.parametrize("inventory", sorted(_inventory_variables()))
def test_no_inventory_sets_a_role_input_a_play_sets(inventory):
    # A play passes these to its roles as role vars, which outrank the inventory: the inventory's
    # value would be ignored. Set the modelserve_* variable the play reads instead.
    ignored = []
    for name, where in sorted(_inventory_variables()[inventory].items()):
        if name in ROLE_INPUTS:
            playbook, wiring = ROLE_INPUTS[name]
            instead = f"set {' / '.join(wiring)} instead" if wiring else "the play decides it"
            ignored.append(f"{where} sets {name}, which playbooks/{playbook} sets for the role: {instead}")
    assert not ignored, "\n".join(ignored)


OVERRIDE_PLAY = """
- name: The wiring values a play sees, with the role inputs it derives from them
  hosts: frontend:broker
  gather_facts: false
  roles:
    - role: modelserve.cluster.modelserve_defaults
  vars: {wired}
  tasks:
    - name: Show them
      ansible.builtin.debug:
        msg: "WIRED {{{{ {names} | to_json }}}}"
"""


def _wired_values(tmp_path, ansible_bin, ansible_env, *inventories) -> list[dict]:
    # The plays' own wiring expressions (their role vars), evaluated as play vars under the real
    # modelserve_defaults role and the given inventories. debug runs on the controller: no host needed.
    wired = {name: role_vars_set_by_plays()[name][1] for name in WIRED}
    names = "{" + ", ".join(f"'{k}': {k}" for k in ["modelserve_http_port", *wired]) + "}"
    play = OVERRIDE_PLAY.format(wired=json.dumps(wired), names=names)
    args = [a for inv in inventories for a in ("-i", inv)]
    res = run_playbook(play, tmp_path, ansible_bin, ansible_env, *args, "-e", "ansible_connection=local")
    assert res.returncode == 0, res.stdout + res.stderr
    prefix = '"msg": "WIRED '
    values = [
        json.loads(json.loads(ln.split('"msg": ', 1)[1]).removeprefix("WIRED "))
        for ln in res.stdout.splitlines()
        if prefix in ln
    ]
    assert len(values) == 3, res.stdout  # two front ends, one broker
    return values


def test_an_inventory_overrides_a_wiring_value(tmp_path, ansible_bin, ansible_env):
    default = _wired_values(tmp_path, ansible_bin, ansible_env, str(ROOT / "inventories" / "local"))
    assert {v["model_serving_http_port"] for v in default} == {8080}

    override = tmp_path / "override"
    (override / "group_vars" / "all").mkdir(parents=True)
    (override / "hosts.yml").write_text("all: {}\n")
    (override / "group_vars" / "all" / "ports.yml").write_text("modelserve_http_port: 8081\n")
    got = _wired_values(
        tmp_path, ansible_bin, ansible_env, str(ROOT / "inventories" / "local"), str(override)
    )
    for v in got:
        assert v["modelserve_http_port"] == v["model_serving_http_port"] == 8081, v
        assert v["common_firewall_rules_by_group"]["frontend"][0]["port"] == 8081, v
        assert v["rabbitmq_amqp_port"] == 5671, v

    # Nothing beside site.yml or the plays (group_vars/ there outrank inventories) hides it either.
    for playbook_dir in (ROOT, ROOT / "playbooks"):
        out = subprocess.run(
            [
                *(ansible_bin / "ansible-inventory", "-i", ROOT / "inventories" / "local", "-i", override),
                *("--playbook-dir", playbook_dir, "--host", "ms-frontend"),
            ],
            cwd=ROOT,
            env=ansible_env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout)["modelserve_http_port"] == 8081, f"overridden beside {playbook_dir}"


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


def test_every_environment_is_tested():
    # The tests take the inventories from the directory: make sure they find them.
    assert {"local", "dev", "svt", "prod", "openstack-local"} <= set(INVENTORIES)


# What inventories/openstack-local may set differently from prod, by file: only what the local
# OpenStack has (cloud, image, flavor, network, no block storage), its addresses and its host names.
OPENSTACK_LOCAL_DIFFERS = {
    # modelserve_vip: the local cloud's scenario does not exercise the VIP port yet.
    "group_vars/all/environment.yml": {
        "modelserve_environment",
        "modelserve_cluster_cidrs",
        "modelserve_vip",
    },
    "group_vars/all/openstack.yml": {
        "openstack_vm_cloud",
        "openstack_vm_image",
        "openstack_vm_flavor",
        "openstack_vm_network",
        "openstack_vm_volume_size",
        "openstack_vm_admin_cidrs",
        "openstack_vm_ssh_jump_host",
    },
    "openstack.yml": {"only_clouds", "server_filters.tags"},
    "group_vars/all/delivery.yml": {"git_deploy_promote_from"},  # no svt stage on the local cloud
}


def _group_tree(node, name="all", tree=None) -> dict[str, tuple[list[str], bool, list[str]]]:
    """Group -> (child groups, whether it has hosts, variable names set inline) of a hosts.yml tree."""
    tree = {} if tree is None else tree
    node = node or {}
    children = node.get("children") or {}
    tree[name] = (sorted(children), bool(node.get("hosts")), sorted(_inventory_hosts_vars(node)))
    for child, sub in children.items():
        _group_tree(sub, child, tree)
    return tree


def _flat(data, prefix="") -> dict:
    """Nested mappings as dotted keys (server_filters.tags)."""
    flat = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings(env: str) -> dict[str, dict]:
    """Each variable file of an inventory (group/host vars, examples, dynamic inventory) -> its values."""
    base = ROOT / "inventories" / env
    files = [p for sub in ("group_vars", "host_vars") for p in sorted((base / sub).rglob("*")) if p.is_file()]
    return {
        str(p.relative_to(base)): _flat(yaml.safe_load(p.read_text()))
        for p in [*files, base / "openstack.yml"]
    }


def test_openstack_local_is_prod_on_the_local_cloud():
    # The local OpenStack run exercises prod's settings, not a special case: same groups, same
    # variable files and variables, the same values but for what OPENSTACK_LOCAL_DIFFERS lists.
    def tree(env):
        return _group_tree(yaml.safe_load((ROOT / "inventories" / env / "hosts.yml").read_text())["all"])

    assert tree("openstack-local") == tree("prod")
    prod, local = _settings("prod"), _settings("openstack-local")
    assert set(local) == set(prod), "inventories/openstack-local must have prod's variable files"
    for path, values in prod.items():
        assert set(local[path]) == set(values), f"{path}: openstack-local must set what prod sets"
        allowed = OPENSTACK_LOCAL_DIFFERS.get(path, set())
        differ = {k for k in values if local[path][k] != values[k]}
        assert differ <= allowed, f"{path}: openstack-local differs from prod in {sorted(differ - allowed)}"
