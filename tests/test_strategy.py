"""The project's default strategy, modelserve.cluster.mitogen_linear (ansible.cfg).

Tasks run inside Mitogen's persistent interpreter when Mitogen is installed; without it the plugin
is Ansible's linear strategy, so a controller lacking Mitogen still runs every playbook.
"""

import importlib.util
import sys

import pytest
import yaml
from conftest import ROOT, run_playbook

PLUGIN = ROOT / "plugins" / "strategy" / "mitogen_linear.py"

# /proc/self/cmdline of the process that runs a module: Mitogen's interpreter names itself
# "python3(mitogen:user@host:pid)", an AnsiballZ run is a plain python3.
PLAY = """
- name: Which process runs a module
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Read the module process's command line
      ansible.builtin.slurp:
        src: /proc/self/cmdline
      register: cmdline
    - name: Print it
      ansible.builtin.debug:
        msg: "CMDLINE={{ cmdline.content | b64decode | replace('\\u0000', ' ') }}"
"""


def module_cmdline(tmp_path, ansible_bin, ansible_env, env=None) -> str:
    res = run_playbook(PLAY, tmp_path, ansible_bin, ansible_env, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "CMDLINE=" in ln)
    return line.split("CMDLINE=", 1)[1]


def test_default_strategy_runs_modules_through_mitogen(tmp_path, ansible_bin, ansible_env):
    pytest.importorskip("ansible_mitogen")
    env = {k: v for k, v in ansible_env.items() if k != "ANSIBLE_STRATEGY"}
    assert "(mitogen:" in module_cmdline(tmp_path, ansible_bin, env)


def test_linear_opt_out_runs_plain_ansiballz(tmp_path, ansible_bin, ansible_env):
    cmdline = module_cmdline(tmp_path, ansible_bin, ansible_env, env={"ANSIBLE_STRATEGY": "linear"})
    assert "mitogen" not in cmdline


def load_plugin(name: str):
    spec = importlib.util.spec_from_file_location(name, PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_mitogen_the_plugin_is_ansibles_linear(monkeypatch):
    from ansible.plugins.strategy import linear

    for name in [n for n in sys.modules if n == "ansible_mitogen" or n.startswith("ansible_mitogen.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ansible_mitogen", None)  # `import ansible_mitogen` raises ImportError
    assert load_plugin("_strategy_without_mitogen").StrategyModule is linear.StrategyModule


def test_with_mitogen_the_plugin_is_mitogens_mixin_over_linear():
    strategy = pytest.importorskip("ansible_mitogen.strategy")
    from ansible.plugins.strategy import linear

    cls = load_plugin("_strategy_with_mitogen").StrategyModule
    assert issubclass(cls, strategy.StrategyMixin)
    assert issubclass(cls, linear.StrategyModule)


def test_local_inventory_uses_a_connection_mitogen_accelerates():
    # Mitogen redirects connections by their short names only; an FQCN such as
    # community.docker.docker silently runs without it (twice as slow on the local cluster).
    conn = yaml.safe_load((ROOT / "inventories/local/group_vars/all/connection.yml").read_text())
    assert conn["ansible_connection"] in {"docker", "ssh"}
