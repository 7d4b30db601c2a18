"""Preflight of model_serving and git_deploy: bad input fails early, naming what to fix.

Runs the roles' preflight on the controller (connection local); nothing is installed.
"""

import json
import sys

import pytest
from conftest import run_playbook

PLAY = """
- name: model_serving preflight only
  hosts: localhost
  connection: local
  gather_facts: false
  environment:
    PATH: "{{ lookup('ansible.builtin.env', 'TEST_PATH') }}"
  tasks:
    - name: Preflight
      ansible.builtin.include_role:
        name: modelserve.cluster.model_serving
        tasks_from: preflight
"""
CREDENTIALS = {
    "host": "broker",
    "port": 5671,
    "user": "modelserve-web",
    "password": "x" * 24,
    "vhost": "modelserve",
}


def preflight(tmp_path, ansible_bin, ansible_env, path="/usr/bin:/bin", **extra):
    evars = {
        "ansible_python_interpreter": sys.executable,
        "model_serving_components": ["web", "worker"],
        "model_serving_web_broker_credentials": CREDENTIALS,
        "model_serving_worker_broker_credentials": dict(CREDENTIALS, user="modelserve-worker"),
    }
    evars.update(extra)
    return run_playbook(
        PLAY,
        tmp_path,
        ansible_bin,
        ansible_env,
        "-i",
        "localhost,",
        "-e",
        json.dumps(evars),
        env={"TEST_PATH": path},
    )


def test_systemd_mode_passes(tmp_path, ansible_bin, ansible_env):
    res = preflight(tmp_path, ansible_bin, ansible_env)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # The argument specs (validated for tasks_from preflight too) check the types and choices.
        (
            {"model_serving_mode": "kubernetes"},
            "value of model_serving_mode must be one of: systemd, compose",
        ),
        (
            {"model_serving_components": ["web", "gpu"]},
            "model_serving_components must be one or more of: web, worker",
        ),
        ({"model_serving_http_port": "http"}, "argument 'model_serving_http_port' is of type str"),
        (
            {"model_serving_web_broker_credentials": dict(CREDENTIALS, port="amqp")},
            "argument 'port' is of type str",
        ),
        # The preflight checks what the specs cannot say.
        ({"model_serving_components": []}, "model_serving_components must not be empty"),
        ({"model_serving_http_port": 70000}, "model_serving_http_port must be 1-65535"),
        ({"model_serving_releases_keep": 1}, "at least 2 (one to roll back to)"),
        ({"model_serving_web_broker_credentials": dict(CREDENTIALS, user="guest")}, "user (not guest)"),
        (
            {"model_serving_worker_broker_credentials": {}},
            "model_serving_worker_broker_credentials needs host, port, user",
        ),
        (
            {"model_serving_worker_broker_credentials": CREDENTIALS},
            "name the same broker user: the web and the workers each have their own",
        ),
        ({"model_serving_web_memory_max": "lots"}, "must be a systemd size (e.g. 1G, 800M) or infinity"),
        ({"model_serving_web_tasks_max": 32}, "must cover web_workers x web_threads + 16"),
        ({"model_serving_drift_min_rows": 0}, "model_serving_drift_min_rows at least 1"),
        ({"model_serving_drift_window": 100}, "at most the window (got 100 and 200)"),
        ({"model_serving_drift_window": "many"}, "argument 'model_serving_drift_window' is of type str"),
    ],
)
def test_bad_input_is_refused_by_name(tmp_path, ansible_bin, ansible_env, extra, message):
    res = preflight(tmp_path, ansible_bin, ansible_env, **extra)
    assert res.returncode != 0
    assert message in " ".join(res.stdout.split()), res.stdout


def test_compose_mode_without_docker_compose_says_how_to_get_it(tmp_path, ansible_bin, ansible_env):
    # An empty PATH: no `docker` at all, as on a host outside the `docker` group.
    empty = tmp_path / "bin"
    empty.mkdir()
    res = preflight(tmp_path, ansible_bin, ansible_env, path=str(empty), model_serving_mode="compose")
    assert res.returncode != 0
    out = " ".join(res.stdout.split())
    assert "model_serving_mode compose needs Docker with Compose v2" in out, out
    assert "`docker` inventory group" in out


GIT_DEPLOY_PLAY = """
- name: git_deploy preflight only
  hosts: workers
  connection: local
  gather_facts: false
  tasks:
    - name: Preflight
      ansible.builtin.include_role:
        name: modelserve.cluster.git_deploy
        tasks_from: preflight
      vars:
        git_deploy_side: production
"""


GIT_DEPLOY_INVENTORY = """
all:
  children:
    workers:
      hosts:
        w1:
    frontend:
      hosts:
        f1:
"""


def git_deploy_preflight(tmp_path, ansible_bin, ansible_env, **extra):
    # The front end is there for git_deploy_model_api_url's default, which the argument specs validate.
    (tmp_path / "hosts.yml").write_text(GIT_DEPLOY_INVENTORY)
    evars = {"ansible_python_interpreter": sys.executable, **extra}
    res = run_playbook(
        GIT_DEPLOY_PLAY,
        tmp_path,
        ansible_bin,
        ansible_env,
        "-i",
        tmp_path / "hosts.yml",
        "-e",
        json.dumps(evars),
    )
    return res.returncode, " ".join(res.stdout.split())


@pytest.mark.parametrize("installed", [True, False])
def test_git_deploy_production_needs_the_apps_release_tool(tmp_path, ansible_bin, ansible_env, installed):
    # A production host whose app is not in a virtualenv (e.g. model_serving in compose mode).
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    if installed:
        (venv / "bin" / "modelserve-release").write_text("#!/bin/sh\n")
    rc, out = git_deploy_preflight(tmp_path, ansible_bin, ansible_env, git_deploy_app_venv=str(venv))
    if installed:
        assert rc == 0, out
    else:
        assert rc != 0
        assert "production hosts need the model_serving role applied first, in systemd mode" in out, out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"git_deploy_side": "staging"},
            "value of git_deploy_side must be one of: production, development, got: staging",
        ),
        ({"git_deploy_min_accuracy": "high"}, "argument 'git_deploy_min_accuracy' is of type str"),
        ({"git_deploy_targets": []}, "which must not be empty"),
        ({"git_deploy_releases_keep": 1}, "git_deploy_releases_keep at least 2"),
        ({"git_deploy_lock_timeout": 0}, "git_deploy_lock_timeout positive"),
        # A run limited away from the repository host would leave joining workers on the seed model.
        ({"git_deploy_repo_host": "f1", "git_deploy_targets": ["w1", "f1"]}, "must be in this play"),
    ],
)
def test_git_deploy_bad_input_is_refused_by_name(tmp_path, ansible_bin, ansible_env, extra, message):
    rc, out = git_deploy_preflight(tmp_path, ansible_bin, ansible_env, **extra)
    assert rc != 0
    assert message in out, out
