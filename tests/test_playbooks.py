"""The thin plays: wiring defaults first, and what they pass into the roles."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = sorted((ROOT / "playbooks").glob("*.yml"))
DEFAULTS_ROLE = "modelserve.cluster.modelserve_defaults"
WIRING = re.compile(r"\bmodelserve_[a-z0-9_]+")


def plays():
    """(playbook, play) for every play of playbooks/*.yml (site.yml only imports them)."""
    for path in PLAYBOOKS:
        for play in yaml.safe_load(path.read_text()) or []:
            if "hosts" in play:
                yield path, play


def _tasks(items):
    for task in items or []:
        yield task
        for key in ("block", "rescue", "always"):
            yield from _tasks(task.get(key))


def role_vars_set_by_plays() -> dict[str, tuple[str, object]]:
    """Role input -> (playbook, value) for every role var a play sets (a `roles:` entry's or an
    include_role's `vars:`). Role vars outrank inventory variables."""
    found = {}
    for path, play in plays():
        sources = [r.get("vars") or {} for r in play.get("roles") or [] if isinstance(r, dict)]
        for section in ("pre_tasks", "tasks", "post_tasks"):
            for task in _tasks(play.get(section)):
                if {"ansible.builtin.include_role", "ansible.builtin.import_role"} & set(task):
                    sources.append(task.get("vars") or {})
        for role_vars in sources:
            for name, value in role_vars.items():
                found[name] = (path.name, value)
    return found


def role_inputs_set_by_plays() -> dict[str, tuple[str, list[str]]]:
    """Role input -> (playbook, the modelserve_* variables its value reads)."""
    return {
        name: (playbook, sorted(set(WIRING.findall(str(value)))))
        for name, (playbook, value) in role_vars_set_by_plays().items()
    }


@pytest.mark.parametrize("path", PLAYBOOKS, ids=lambda p: p.name)
def test_every_play_lists_the_defaults_role_first(path):
    # A role's defaults are in scope only in a play that lists the role: without it, a template
    # reading a modelserve_* value fails, or falls back to a role's own `| default(...)` silently.
    for play in yaml.safe_load(path.read_text()) or []:
        if "hosts" not in play:
            continue
        roles = [r["role"] if isinstance(r, dict) else r for r in play.get("roles") or []]
        assert roles[:1] == [DEFAULTS_ROLE], (
            f"{path.name}: play {play['name']!r} does not list {DEFAULTS_ROLE} first"
        )


def test_plays_wire_role_inputs_from_modelserve_variables():
    # The test below relies on finding the wiring; make sure it does.
    inputs = role_inputs_set_by_plays()
    assert inputs["model_serving_http_port"][1] == ["modelserve_http_port"]
    assert inputs["common_firewall_rules_by_group"][1] == ["modelserve_firewall_rules_by_group"]
