"""The git_deploy hooks against a real bare repository, real `git push`es and a real model directory.

The fan-out over SSH, sudo and the served API are covered by molecule/git_deploy; this checks the
gate and the change logic quickly, with this host as the one target (the app's own release tool,
no sudo): what is refused, with which message, that a refusal changes nothing, the desired-release
record, the change lock, all-or-nothing restores and rollback to a named release.
"""

import fcntl
import getpass
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "roles" / "git_deploy" / "files" / "deploy_hook.py"
SEED = ROOT / "app" / "seed-release"
EVAL = str(ROOT / "app" / "data" / "pima-indians-diabetes.csv")

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
        "min_auc": 0.75,
        "max_accuracy_drop": 0.05,
        "max_auc_drop": 0.05,
        # The gate's program without its sandbox (molecule/git_deploy runs the sandboxed one).
        "gate_command": [str(Path(sys.executable).parent / "modelserve-release"), "evaluate", "--data", EVAL],
        "gate_timeout": 60,
        "staging": str(tmp_path / "state" / "staging"),
        "max_release_bytes": 2 * 2**20,
        "keep": 3,
        "switch_timeout": 1,
        "api_url": "",  # no front end here: each target's own confirmation only
        "model_dir": str(model_dir),
        "model_user": getpass.getuser(),  # the release tool runs without sudo
        "cli": str(Path(sys.executable).parent / "modelserve-release"),
        "incoming": str(tmp_path / "incoming"),
        "log": str(tmp_path / "deploy.log"),
        "state_dir": str(tmp_path / "state"),
        "lock_timeout": 2,
        "targets": [{"name": "here", "address": "127.0.0.1", "user": "deploy", "local": True}],
    }
    (tmp_path / "state").mkdir()
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


def conf_of(bare: Path) -> dict:
    return json.loads((bare.parent / "deploy.json").read_text())


def reconfigure(bare: Path, **changes) -> None:
    (bare.parent / "deploy.json").write_text(json.dumps({**conf_of(bare), **changes}))


def serving(bare: Path) -> str:
    return Path(os.readlink(bare.parent / "srv" / "current")).name


def state(bare: Path) -> dict:
    return json.loads((bare.parent / "state" / "state.json").read_text())


def hook(*args):
    return subprocess.run([sys.executable, str(HOOK), *args], capture_output=True, text=True, check=False)


def release(work: Path, version: str, **metrics) -> None:
    rel = work / "release"
    shutil.rmtree(rel, ignore_errors=True)
    shutil.copytree(SEED, rel)
    meta = json.loads((rel / "metadata.json").read_text())
    meta["version"] = version
    meta["metrics"].update(metrics)
    (rel / "metadata.json").write_text(json.dumps(meta))
    commit(work, version)


def commit(work: Path, message: str) -> None:
    assert git("add", "-A", cwd=work).returncode == 0
    assert git("commit", "-q", "-m", message, cwd=work).returncode == 0


def push(work, ref="main"):
    return git("push", "production", f"HEAD:{ref}", cwd=work)


def refused(work, *texts):
    """Push; the push fails and its output says each of `texts`."""
    res = push(work)
    assert res.returncode != 0
    for text in texts:
        assert text in res.stderr, res.stderr
    return res


def branch_exists(bare, name="main"):
    return git("rev-parse", "--verify", "-q", f"refs/heads/{name}", cwd=bare).returncode == 0


def test_a_higher_valid_version_is_accepted(prod):
    work, bare = prod
    release(work, "1.1.0")
    res = push(work)
    assert res.returncode == 0, res.stderr
    assert "release 1.1.0 passed the gate (measured on 765 rows: accuracy 0.8157, AUC 0.8828; " in res.stderr
    assert "deployed 1.1.0 to 1 host(s); each confirmed it serves it" in res.stderr
    assert branch_exists(bare)
    assert serving(bare) == "1.1.0"
    # The one record of what production serves, and the store later workers are served from.
    assert state(bare)["desired"] == "1.1.0" and state(bare)["history"] == ["1.1.0", "1.0.0"]
    assert sorted(p.name for p in (bare.parent / "state" / "releases").iterdir()) == ["1.0.0", "1.1.0"]


def test_same_or_lower_version_is_refused_and_nothing_is_stored(prod):
    work, bare = prod
    release(work, "1.0.0")
    refused(work, "version 1.0.0 is not higher than the served 1.0.0", "production keeps serving 1.0.0")
    assert not branch_exists(bare)


@pytest.fixture(scope="module")
def weak_release(tmp_path_factory):
    """A real release trained for one epoch: loads and runs, but predicts poorly."""
    train = pytest.importorskip("modelserve.train")
    out = tmp_path_factory.mktemp("weak") / "release"
    train.train(EVAL, out, "1.2.0", epochs=1, seed=1)
    return out


def push_weak(work, weak_release, **claims):
    shutil.rmtree(work / "release", ignore_errors=True)
    shutil.copytree(weak_release, work / "release")
    meta = json.loads((work / "release" / "metadata.json").read_text())
    meta["metrics"].update(claims)
    (work / "release" / "metadata.json").write_text(json.dumps(meta))
    commit(work, "weak")
    return push(work)


def test_forged_metrics_are_ignored_the_gate_measures_for_itself(prod, weak_release):
    work, bare = prod
    res = push_weak(work, weak_release, heldout_accuracy=0.99, heldout_auc=0.99)
    assert res.returncode != 0
    # (a one-epoch model's figures vary a little with the CPU: matched by pattern)
    for pattern in (
        r"release 1\.2\.0 measured on production's 765 evaluation rows: "
        r"accuracy 0\.\d{4} is below the floor 0\.65",
        r"AUC 0\.\d{4} is below the floor 0\.75",
        r"its metadata claims accuracy 0\.99 and AUC 0\.99; the gate ignores claims",
    ):
        assert re.search(pattern, res.stderr), res.stderr
    assert serving(bare) == "1.0.0" and not branch_exists(bare)
    # The other way round: a sound model whose metadata undersells it is accepted on its figures.
    release(work, "1.2.1", heldout_accuracy=0.1, heldout_auc=0.1)
    assert push(work).returncode == 0
    assert serving(bare) == "1.2.1"


def test_a_drop_against_the_served_release_is_refused_above_the_floors(prod, weak_release):
    work, bare = prod
    reconfigure(bare, min_accuracy=0.0, min_auc=0.0)
    res = push_weak(work, weak_release)
    assert res.returncode != 0
    drop = r"accuracy 0\.\d{4} is 0\.[1-9]\d{3} below the served 1\.0\.0's 0\.8157 \(at most 0\.05"
    assert re.search(drop, res.stderr), res.stderr
    assert "below the floor" not in res.stderr
    reconfigure(bare, max_accuracy_drop=1.0, max_auc_drop=1.0)  # the operator accepts the fall
    assert push(work).returncode == 0
    assert serving(bare) == "1.2.0"


def test_a_gate_that_cannot_measure_refuses_the_push(prod):
    work, bare = prod
    reconfigure(bare, gate_command=[*conf_of(bare)["gate_command"][:-1], str(bare.parent / "missing.csv")])
    release(work, "1.1.0")
    refused(work, "the release gate could not measure the release:", "missing.csv")
    assert serving(bare) == "1.0.0"


def test_staging_is_emptied_after_every_push_even_an_interrupted_one(prod):
    work, bare = prod
    staging = bare.parent / "state" / "staging"
    staging.mkdir()
    (staging / "tmp-left-by-a-killed-push").mkdir()
    release(work, "1.1.0")
    assert push(work).returncode == 0
    assert list(staging.iterdir()) == []
    (work / "release" / "model.tflite").write_bytes(b"garbage")
    commit(work, "corrupt")
    refused(work, "model.tflite")
    assert list(staging.iterdir()) == []


def test_a_corrupt_model_file_is_refused(prod):
    work, bare = prod
    release(work, "1.3.0")
    (work / "release" / "model.tflite").write_bytes(b"garbage")
    git("commit", "-qam", "corrupt", cwd=work)
    refused(work, "REJECTED: invalid model release", "model.tflite")
    assert not branch_exists(bare)


def test_a_model_that_does_not_load_is_refused_by_the_gate_not_loaded_by_the_hook(prod):
    work, bare = prod
    release(work, "1.3.0")
    rel = work / "release"
    (rel / "model.tflite").write_bytes(b"not a model" * 100)
    meta = json.loads((rel / "metadata.json").read_text())  # checksums made to match: only loading tells
    meta["files"]["model.tflite"]["sha256"] = hashlib.sha256((rel / "model.tflite").read_bytes()).hexdigest()
    (rel / "metadata.json").write_text(json.dumps(meta))
    commit(work, "corrupt, consistent checksums")
    refused(
        work, "REJECTED: the release gate could not measure the release", "model.tflite does not load or run"
    )
    assert not branch_exists(bare) and serving(bare) == "1.0.0"


def test_a_tree_without_a_release_is_refused(prod):
    work, _ = prod
    (work / "README").write_text("no model here\n")
    commit(work, "docs")
    refused(work, "has no 'release/' directory")


def test_an_oversized_release_is_refused(prod):
    work, _ = prod
    release(work, "1.4.0")
    (work / "release" / "notes.bin").write_bytes(os.urandom(3 * 2**20))
    commit(work, "big")
    refused(work, "over the 2 MiB limit")


def test_other_branches_pass_the_gate_untouched(prod):
    work, bare = prod
    release(work, "0.0.1", heldout_accuracy=0.1)  # would be refused on main
    res = push(work, "experiment")
    assert res.returncode == 0, res.stderr
    assert branch_exists(bare, "experiment")


def test_an_unreachable_target_refuses_the_push_before_anything_changes(prod):
    work, bare = prod
    unreachable = {"name": "gone", "address": "gone.invalid", "user": "deploy", "local": False}
    reconfigure(bare, targets=[*conf_of(bare)["targets"], unreachable])
    release(work, "1.1.0")
    refused(work, "REJECTED: gone: current failed", "nothing was changed")
    assert not branch_exists(bare)
    assert serving(bare) == "1.0.0"
    assert not (bare.parent / "srv" / "releases" / "1.1.0").exists()


def test_a_failure_after_activation_puts_every_target_back_and_names_where(prod):
    work, bare = prod
    # Activation succeeds here, then the front end never reports the release: all of it is undone.
    reconfigure(bare, api_url="http://127.0.0.1:9/api/v1/model")
    release(work, "1.1.0")
    refused(work, "deploy of 1.1.0 FAILED on the front end", "every target is back on 1.0.0")
    assert serving(bare) == "1.0.0"
    assert not branch_exists(bare)  # the branch stays what production serves
    assert state(bare)["desired"] == "1.0.0"
    reconfigure(bare, api_url="")
    res = push(work)  # the same commit again, once the cause is fixed
    assert res.returncode == 0, res.stderr
    assert serving(bare) == "1.1.0"


def test_a_push_during_another_change_waits_a_bounded_time_then_is_refused(prod):
    work, bare = prod
    lock_dir = bare.parent / "state"
    (lock_dir / "lock.info").write_text("the rollback to 0.9.0 (pid 1)\n")
    with open(lock_dir / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        release(work, "1.1.0")
        refused(
            work,
            "waiting up to 2 s for the rollback to 0.9.0",
            "the rollback to 0.9.0 (pid 1) still holds the change lock after 2 s",
        )
    assert not branch_exists(bare)
    assert serving(bare) == "1.0.0"
    assert push(work).returncode == 0  # once it is released


def test_rollback_to_a_named_release_this_host_no_longer_has(prod):
    work, bare = prod
    for version in ("1.1.0", "1.2.0"):
        release(work, version)
        assert push(work).returncode == 0
    assert hook("rollback").returncode == 0  # default: the release served before
    assert serving(bare) == "1.1.0"
    assert state(bare)["history"][:3] == ["1.1.0", "1.2.0", "1.1.0"]
    # This host's own history differs from production's: the release comes from the store.
    shutil.rmtree(bare.parent / "srv" / "releases" / "1.0.0")
    res = hook("rollback", "1.0.0")
    assert res.returncode == 0, res.stdout
    assert "rolled back from 1.1.0 to 1.0.0" in res.stdout
    assert serving(bare) == "1.0.0"
    assert "rolled back 1.1.0 -> 1.0.0" in (bare.parent / "deploy.log").read_text()
    res = hook("rollback", "0.1.0")
    assert res.returncode != 0 and "release 0.1.0 is not in the release store" in res.stdout
    assert serving(bare) == "1.0.0"


def test_sync_serves_the_desired_release_and_never_an_unrecorded_older_one(prod):
    work, bare = prod
    release(work, "1.1.0")
    assert push(work).returncode == 0
    srv = bare.parent / "srv"
    os.unlink(srv / "current")  # a rebuilt host: the seed only
    shutil.rmtree(srv / "releases" / "1.1.0")
    os.symlink("releases/1.0.0", srv / "current")
    res = hook("sync")
    assert res.returncode == 0, res.stdout
    assert "here now serve 1.1.0" in res.stdout and serving(bare) == "1.1.0"
    assert "every target serves 1.1.0" in hook("sync").stdout
    # A host ahead of the record (a release production never recorded) is not moved backwards.
    shutil.copytree(srv / "releases" / "1.1.0", srv / "releases" / "9.0.0")
    meta = json.loads((srv / "releases" / "9.0.0" / "metadata.json").read_text())
    (srv / "releases" / "9.0.0" / "metadata.json").write_text(json.dumps({**meta, "version": "9.0.0"}))
    os.unlink(srv / "current")
    os.symlink("releases/9.0.0", srv / "current")
    res = hook("sync")
    assert res.returncode != 0 and "here serves 9.0.0, newer than the desired 1.1.0" in res.stdout
    assert serving(bare) == "9.0.0"


def test_of_two_concurrent_pushes_the_second_waits_and_is_refused_because_the_branch_moved(prod):
    work, bare = prod

    # A front end that takes 2 s to report the release keeps the first deploy busy.
    class SlowModel(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(2)
            body = json.dumps({"version": "1.1.0"}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    reconfigure(bare, api_url=f"http://127.0.0.1:{server.server_port}/", switch_timeout=10, lock_timeout=20)
    second = bare.parent / "second"
    shutil.copytree(work, second)
    release(work, "1.1.0")
    release(second, "1.2.0")
    first = subprocess.Popen(
        ["git", "push", "production", "HEAD:main"], cwd=work, stderr=subprocess.PIPE, text=True
    )
    try:
        info = bare.parent / "state" / "lock.info"
        deadline = time.monotonic() + 10
        while not (info.exists() and "push of" in info.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        res = push(second)
    finally:
        _, first_err = first.communicate(timeout=60)
        server.shutdown()
    assert first.returncode == 0, first_err
    assert res.returncode != 0
    assert "waiting up to 20 s for the push of" in res.stderr, res.stderr
    assert "moved to" in res.stderr and "while this push waited" in res.stderr
    assert serving(bare) == "1.1.0" and state(bare)["desired"] == "1.1.0"
