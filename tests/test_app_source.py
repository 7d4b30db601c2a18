"""modelserve_app_source: the one variable naming the app's source, resolved by the app_source lookup."""

import os

from conftest import ROOT, run_playbook

PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Where the app is
      ansible.builtin.debug:
        msg: >-
          APP={{ lookup('modelserve.cluster.app_source') }}
          EDGE={{ lookup('modelserve.cluster.app_source', 'edge') }}
"""


def _run(tmp_path, ansible_bin, ansible_env, *extra):
    return run_playbook(PLAY, tmp_path, ansible_bin, ansible_env, "-i", "localhost,", "-c", "local", *extra)


def _paths(res):
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "APP=" in ln)
    app, edge = line.split("APP=", 1)[1].rstrip('"').split(" EDGE=")
    return app, edge


def test_default_is_the_collections_own_app(tmp_path, ansible_bin, ansible_env):
    # Found from where Ansible loaded the collection (here the checkout linked into .cache/collections).
    app, edge = _paths(_run(tmp_path, ansible_bin, ansible_env))
    assert os.path.realpath(app) == str(ROOT / "app")
    assert os.path.realpath(edge) == str(ROOT / "app" / "edge")


def test_modelserve_app_source_overrides(tmp_path, ansible_bin, ansible_env):
    other = tmp_path / "checkout" / "app"
    other.mkdir(parents=True)
    res = _run(tmp_path, ansible_bin, ansible_env, "-e", f"modelserve_app_source={other}")
    assert _paths(res) == (str(other), str(other / "edge"))


def test_a_missing_source_is_refused_by_name(tmp_path, ansible_bin, ansible_env):
    res = _run(tmp_path, ansible_bin, ansible_env, "-e", "modelserve_app_source=/nonexistent")
    assert res.returncode != 0
    assert "set modelserve_app_source" in res.stdout + res.stderr
