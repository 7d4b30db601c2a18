"""The locks hosts install from (scripts/lock): hashed, covering pyproject.toml, current, used.

The locks and what each covers are read from scripts/lock's `lock DIR LOCK IN EXTRA...` lines, the
one place that says it.
"""

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "lock"
# The hosts the locks are for (scripts/lock): Debian 12's CPython on Linux; markers evaluated so.
HOST_ENV = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux",
            "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "platform_machine": "x86_64"}  # fmt: skip


def _locks():
    out = []
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("lock "):
            _, project, lock, infile, *extras = shlex.split(line)
            out.append((project, lock, infile, extras))
    return out


LOCKS = _locks()
IDS = [f"{project}/{lock}" for project, lock, _, _ in LOCKS]


def parse_lock(text):
    """{name: (version, [hashes])} of a requirements lock; ValueError on any line that is not a pin."""
    pins = {}
    logical = re.sub(r"\\\n", " ", text)
    for raw in logical.splitlines():
        line = raw.split(" #")[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        if not m:
            raise ValueError(f"not a pinned, hashed requirement: {line!r}")
        hashes = re.findall(r"sha256:([0-9a-f]{64})", m.group(3))
        pins[canonicalize_name(m.group(1))] = (m.group(2), hashes)
    return pins


def requirements_of(project_dir, infile, extras):
    """What the lock must satisfy: pyproject's dependencies and named extras, and the .in file's."""
    meta = tomllib.loads((project_dir / "pyproject.toml").read_text())["project"]
    reqs = list(meta.get("dependencies", []))
    for extra in extras:
        reqs += meta["optional-dependencies"][extra]
    for line in (project_dir / infile).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            reqs.append(line)
    return [Requirement(r) for r in reqs]


def problems(pins, reqs):
    """Requirements the pins do not satisfy (missing, or a version out of range)."""
    out = []
    for req in reqs:
        if req.marker and not req.marker.evaluate(HOST_ENV):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            out.append(f"{req} is not locked")
        elif not req.specifier.contains(pin[0], prereleases=True):
            out.append(f"{req} but the lock has {pin[0]}")
    return out


def test_the_script_names_the_locks():
    assert {lock for _, lock, _, _ in LOCKS} == {"requirements/web-worker.lock", "requirements/edge.lock"}


@pytest.mark.parametrize(("project", "lock", "infile", "extras"), LOCKS, ids=IDS)
def test_every_pin_is_exact_and_hashed(project, lock, infile, extras):
    text = (ROOT / project / lock).read_text()
    pins = parse_lock(text)
    assert pins, f"{project}/{lock} pins nothing"
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"{project}/{lock}: no hash for {unhashed}"
    # Nothing of the machine that wrote it: no index, no local path.
    assert not re.search(r"^\s*-(-index-url|-extra-index-url|-find-links|i|f|e)\b", text, re.M)
    assert "/work/" not in text and "file://" not in text and "http" not in text


def test_parse_lock_refuses_an_unhashed_or_unpinned_line():
    good = "flask==3.1.3 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\n"
    assert parse_lock(good) == {"flask": ("3.1.3", ["a" * 64])}
    assert parse_lock("flask==3.1.3\n") == {"flask": ("3.1.3", [])}  # caught by the hash check
    for bad in ("flask>=3\n", "-e .\n", "flask @ file:///tmp/flask.whl\n"):
        with pytest.raises(ValueError):
            parse_lock(bad)


@pytest.mark.parametrize(("project", "lock", "infile", "extras"), LOCKS, ids=IDS)
def test_the_lock_covers_pyproject(project, lock, infile, extras):
    """Offline: every requirement of pyproject.toml (its dependencies and the locked extras) is
    locked at a version in its range. A dependency added without `scripts/lock` fails here."""
    pins = parse_lock((ROOT / project / lock).read_text())
    reqs = requirements_of(ROOT / project, infile, extras)
    assert reqs
    assert problems(pins, reqs) == [], f"run scripts/lock: {problems(pins, reqs)}"


def test_a_requirement_added_but_not_locked_is_a_problem():
    pins = {"flask": ("3.1.3", ["a" * 64])}
    assert problems(pins, [Requirement("flask>=3.0")]) == []
    assert problems(pins, [Requirement("flask>=4")]) == ["flask>=4 but the lock has 3.1.3"]
    assert problems(pins, [Requirement("requests>=2")]) == ["requests>=2 is not locked"]
    assert problems(pins, [Requirement("colorama; sys_platform == 'win32'")]) == []


def test_the_roles_install_from_the_locks():
    model_serving = yaml.safe_load((ROOT / "roles/model_serving/defaults/main.yml").read_text())
    iot_edge = yaml.safe_load((ROOT / "roles/iot_edge/defaults/main.yml").read_text())
    used = {
        ("app", model_serving["model_serving_requirements_lock"]),
        ("app/edge", iot_edge["iot_edge_requirements_lock"]),
    }
    assert used == {(project, lock) for project, lock, _, _ in LOCKS}


def test_the_locks_are_current():
    """`scripts/lock --check`: uv re-resolves pyproject.toml (preferring the locked versions) and the
    result must be the checked-in lock, byte for byte. Needs uv (requirements.txt) and the index."""
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run([str(SCRIPT), "--check"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
