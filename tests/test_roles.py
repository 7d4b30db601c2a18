"""Every role's public interface: argument_specs match defaults, names carry the role prefix."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks" / "main.yml").exists())


def _load(path: Path):
    return yaml.safe_load(path.read_text()) if path.exists() else None


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_defaults(role):
    defaults = _load(ROOT / "roles" / role / "defaults" / "main.yml") or {}
    specs = _load(ROOT / "roles" / role / "meta" / "argument_specs.yml")
    assert specs, f"roles/{role}/meta/argument_specs.yml missing"
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) <= set(options), f"undocumented defaults: {sorted(set(defaults) - set(options))}"
    for name, spec in options.items():
        assert spec.get("description"), f"{role}: {name} has no description"
        if name in defaults and "default" in spec:
            assert spec["default"] == defaults[name], f"{role}: {name} default differs from defaults/"


@pytest.mark.parametrize("role", ROLES)
def test_public_variables_are_prefixed(role):
    defaults = _load(ROOT / "roles" / role / "defaults" / "main.yml") or {}
    bad = [k for k in defaults if not k.startswith(f"{role}_")]
    assert not bad, f"roles/{role}/defaults: not prefixed with {role}_: {bad}"


def _internal(role):
    # An internal role (its README's title says so) is included by other roles, not applied by a play.
    readme = ROOT / "roles" / role / "README.md"
    return readme.exists() and readme.read_text().splitlines()[0].endswith("(internal)")


@pytest.mark.parametrize("role", ROLES)
def test_role_has_preflight_readme_and_scenario(role):
    assert (ROOT / "roles" / role / "tasks" / "preflight.yml").exists()
    assert (ROOT / "roles" / role / "README.md").exists()
    if _internal(role):
        # Tested through the scenarios of the roles that include it: at least one must.
        users = [
            p
            for p in (ROOT / "roles").glob("*/tasks/*.yml")
            if p.parts[-3] != role and f"name: modelserve.cluster.{role}\n" in p.read_text()
        ]
        assert users, f"internal role {role} is included by no other role"
    else:
        assert (ROOT / "molecule" / role / "molecule.yml").exists()


def test_no_role_reaches_outside_itself():
    # The app's source comes from modelserve_app_source (the app_source lookup), not role_path/../..
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in (ROOT / "roles").rglob("*")
        if p.is_file() and p.suffix in {".yml", ".j2", ".md"}
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "role_path }}/.." in line
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("role", ROLES)
def test_readme_roles_table_lists_the_role_and_real_variables(role):
    # The README's table is where a newcomer looks first: every role has a row, and the variables
    # it names exist in that role's defaults (a renamed variable breaks this, not the reader).
    readme = (ROOT / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith(f"| `{role}` |")]
    assert rows, f"README's Roles table has no row for {role}"
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())
    named = re.findall(r"`([a-z0-9_]+)`", rows[-1].rsplit("|", 2)[-2])
    assert named, f"README's row for {role} names no variables"
    assert set(named) <= set(defaults), f"not in {role}'s defaults: {sorted(set(named) - set(defaults))}"


def _handlers(role):
    path = ROOT / "roles" / role / "handlers" / "main.yml"
    return (_load(path) or []) if path.exists() else []


@pytest.mark.parametrize("role", ROLES)
def test_handlers_are_sentences_listening_to_role_topics(role):
    # One naming scheme: a handler's name is a plain sentence; tasks notify a `listen:` topic
    # "<role> | <what>" (task names carry their file's prefix, which ansible-lint's name[prefix] checks).
    for handler in _handlers(role):
        name = handler["name"]
        assert " | " not in name and name[:1].isupper(), f"{role} handler {name!r}: a capitalised sentence"
        topics = handler.get("listen", [])
        for topic in [topics] if isinstance(topics, str) else topics:
            assert topic.startswith(f"{role} | "), f"{role} handler {name!r} listens to {topic!r}"


@pytest.mark.parametrize("role", ROLES)
def test_os_specific_variables_load_the_same_way(role):
    # Every role with per-OS vars loads them first thing in its preflight (tagged always), first_found
    # over the candidate list in vars/main.yml (so preflight alone, tasks_from: preflight, has them too).
    os_files = [p for p in (ROOT / "roles" / role / "vars").glob("*.yml") if p.name != "main.yml"]
    if not os_files:
        pytest.skip(f"{role} has no per-OS variables")
    first = _load(ROOT / "roles" / role / "tasks" / "preflight.yml")[0]
    assert first["name"] == "preflight | Load the OS-specific variables"
    assert first["ansible.builtin.include_vars"] == (
        f"{{{{ lookup('ansible.builtin.first_found', __{role}_os_vars) }}}}"
    )
    assert first["vars"] == {
        f"__{role}_os_vars": {"files": f"{{{{ __{role}_os_vars_files }}}}", "paths": ["{{ role_path }}/vars"]}
    }
    assert first.get("tags") == ["always"], "loaded under any --tags selection"
    assert f"__{role}_os_vars_files" in _load(ROOT / "roles" / role / "vars" / "main.yml")


def test_defaults_role_declares_modelserve_variables():
    # modelserve_defaults has no tasks (not in ROLES): its variables are the project's modelserve_*
    # wiring values, each declared in its argument_specs with the same default where one is given.
    role = ROOT / "roles" / "modelserve_defaults"
    assert not (role / "tasks").exists(), "modelserve_defaults holds defaults only"
    defaults = _load(role / "defaults" / "main.yml")
    options = _load(role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    assert all(name.startswith("modelserve_") for name in defaults)
    for name, spec in options.items():
        assert spec.get("description"), name
        if "default" in spec:
            assert spec["default"] == defaults[name], name
    assert (role / "README.md").exists()
