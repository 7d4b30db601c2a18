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


@pytest.mark.parametrize("role", ROLES)
def test_role_has_preflight_readme_and_scenario(role):
    assert (ROOT / "roles" / role / "tasks" / "preflight.yml").exists()
    assert (ROOT / "roles" / role / "README.md").exists()
    assert (ROOT / "molecule" / role / "molecule.yml").exists()


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
