"""The git_deploy pre-receive hook against a real bare repository and real `git push`es.

The full deploy (fan-out over SSH, sudo, the served API) is covered by molecule/git_deploy; this
checks the gate itself quickly: what is refused, with which message, and that a refusal stores
nothing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "roles" / "git_deploy" / "files" / "deploy_hook.py"
SEED = ROOT / "app" / "seed-release"

pytest.importorskip("modelserve.release", reason="the app is installed by scripts/bootstrap --test")


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture
def prod(tmp_path):
    """A bare repository with the hook, a model dir serving the seed release, and a work tree."""
    model_dir = tmp_path / "srv"
    (model_dir / "releases").mkdir(parents=True)
    shutil.copytree(SEED, model_dir / "releases" / "1.0.0")
    os.symlink("releases/1.0.0", model_dir / "current")
    conf = {
        "branch": "main",
        "release_path": "release",
        "min_accuracy": 0.65,
        "max_release_bytes": 2 * 2**20,
        "keep": 3,
        "switch_timeout": 5,
        "api_url": "http://127.0.0.1:9/api/v1/model",
        "model_dir": str(model_dir),
        "model_user": "nobody",
        "cli": "/bin/false",
        "incoming": str(tmp_path / "incoming"),
        "log": str(tmp_path / "deploy.log"),
        "targets": [],
    }
    (tmp_path / "deploy.json").write_text(json.dumps(conf))
    bare = tmp_path / "models.git"
    assert git("init", "--bare", "-q", "--initial-branch=main", str(bare), cwd=tmp_path).returncode == 0
    hook = bare / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\nexec {sys.executable} {HOOK} pre-receive\n")
    hook.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    for args in (
        ("init", "-q", "--initial-branch=main"),
        ("config", "user.name", "t"),
        ("config", "user.email", "t@example.invalid"),
        ("remote", "add", "production", str(bare)),
    ):
        assert git(*args, cwd=work).returncode == 0
    os.environ["MODELSERVE_DEPLOY_CONFIG"] = str(tmp_path / "deploy.json")
    yield work, bare
    os.environ.pop("MODELSERVE_DEPLOY_CONFIG", None)


def release(work: Path, version: str, **metrics) -> None:
    rel = work / "release"
    shutil.rmtree(rel, ignore_errors=True)
    shutil.copytree(SEED, rel)
    meta = json.loads((rel / "metadata.json").read_text())
    meta["version"] = version
    meta["metrics"].update(metrics)
    (rel / "metadata.json").write_text(json.dumps(meta))
    assert git("add", "-A", cwd=work).returncode == 0
    assert git("commit", "-q", "-m", version, cwd=work).returncode == 0


def push(work, ref="main"):
    return git("push", "production", f"HEAD:{ref}", cwd=work)


def branch_exists(bare, name="main"):
    return git("rev-parse", "--verify", "-q", f"refs/heads/{name}", cwd=bare).returncode == 0


def test_a_higher_valid_version_is_accepted(prod):
    work, bare = prod
    release(work, "1.1.0")
    res = push(work)
    assert res.returncode == 0, res.stderr
    assert "release 1.1.0 accepted" in res.stderr
    assert branch_exists(bare)


def test_same_or_lower_version_is_refused_and_nothing_is_stored(prod):
    work, bare = prod
    release(work, "1.0.0")
    res = push(work)
    assert res.returncode != 0
    assert "version 1.0.0 is not higher than the served 1.0.0" in res.stderr
    assert "production keeps serving 1.0.0" in res.stderr
    assert not branch_exists(bare)


def test_accuracy_under_the_threshold_is_refused(prod):
    work, _ = prod
    release(work, "1.2.0", heldout_accuracy=0.5)
    res = push(work)
    assert res.returncode != 0
    assert "below the production threshold 0.65" in res.stderr


def test_a_corrupt_model_file_is_refused(prod):
    work, bare = prod
    release(work, "1.3.0")
    (work / "release" / "model.tflite").write_bytes(b"garbage")
    git("commit", "-qam", "corrupt", cwd=work)
    res = push(work)
    assert res.returncode != 0
    assert "REJECTED: invalid model release" in res.stderr and "model.tflite" in res.stderr
    assert not branch_exists(bare)


def test_a_tree_without_a_release_is_refused(prod):
    work, _ = prod
    (work / "README").write_text("no model here\n")
    git("add", "-A", cwd=work)
    git("commit", "-qm", "docs", cwd=work)
    res = push(work)
    assert res.returncode != 0
    assert "has no 'release/' directory" in res.stderr


def test_an_oversized_release_is_refused(prod):
    work, _ = prod
    release(work, "1.4.0")
    (work / "release" / "notes.bin").write_bytes(os.urandom(3 * 2**20))
    git("add", "-A", cwd=work)
    git("commit", "-qm", "big", cwd=work)
    res = push(work)
    assert res.returncode != 0
    assert "over the 2 MiB limit" in res.stderr


def test_other_branches_pass_the_gate_untouched(prod):
    work, bare = prod
    release(work, "0.0.1", heldout_accuracy=0.1)  # would be refused on main
    res = push(work, "experiment")
    assert res.returncode == 0, res.stderr
    assert branch_exists(bare, "experiment")
