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


def make_stage(tmp_path: Path, environment: str = "production", promote_from: str = "") -> tuple[Path, Path]:
    """A bare repository with the hook, a model dir serving the seed release, and a work tree."""
    tmp_path.mkdir(parents=True, exist_ok=True)
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
        "environment": environment,
        "promote_from": promote_from,
        "promote_soak": 0,
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
    return work, bare


@pytest.fixture
def prod(tmp_path):
    work, bare = make_stage(tmp_path)
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


def hook(*args, bare: Path | None = None):
    """Run a hook command; with `bare`, as that stage's (its own configuration)."""
    env = {**os.environ, "MODELSERVE_DEPLOY_CONFIG": str(bare.parent / "deploy.json")} if bare else None
    return subprocess.run(
        [sys.executable, str(HOOK), *args], capture_output=True, text=True, check=False, env=env
    )


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


# --- canary releases: `git push -o canary=N`, then promote or abort ------------------------------


def add_workers(bare: Path, *names: str) -> None:
    """More local targets, each with a model directory of its own serving the seed release."""
    targets = conf_of(bare)["targets"]
    for name in names:
        srv = bare.parent / f"srv-{name}"
        (srv / "releases").mkdir(parents=True)
        shutil.copytree(SEED, srv / "releases" / "1.0.0")
        os.symlink("releases/1.0.0", srv / "current")
        own = {"model_dir": str(srv), "incoming": str(bare.parent / f"incoming-{name}")}
        targets.append({"name": name, "address": "127.0.0.1", "user": "deploy", "local": True, **own})
    reconfigure(bare, targets=targets)


def serving_on(bare: Path, name: str) -> str:
    srv = bare.parent / ("srv" if name == "here" else f"srv-{name}")
    return Path(os.readlink(srv / "current")).name


@pytest.fixture
def fleet(prod):
    work, bare = prod
    assert git("config", "receive.advertisePushOptions", "true", cwd=bare).returncode == 0
    add_workers(bare, "there")
    return work, bare


def canary_push(work, percent, ref="main"):
    return git("push", "-o", f"canary={percent}", "production", f"HEAD:{ref}", cwd=work)


def test_a_canary_is_installed_everywhere_and_served_on_its_share(fleet):
    work, bare = fleet
    release(work, "1.1.0")
    res = canary_push(work, 50)
    assert res.returncode == 0, res.stderr
    assert "canary 1.1.0 installed on 2 host(s), served by there" in res.stderr
    assert "the others keep serving 1.0.0" in res.stderr and "modelserve-canary promote" in res.stderr
    assert branch_exists(bare)  # the push is accepted
    assert serving_on(bare, "here") == "1.0.0" and serving_on(bare, "there") == "1.1.0"
    assert (bare.parent / "srv" / "releases" / "1.1.0").is_dir()  # promoting only activates
    s = state(bare)
    assert s["desired"] == "1.0.0" and s["history"] == ["1.0.0"]
    assert {k: s["canary"][k] for k in ("version", "hosts", "percent")} == {
        "version": "1.1.0",
        "hosts": ["there"],
        "percent": 50,
    }
    assert "canary 1.0.0" not in hook("canary", "status").stdout
    assert "canary 1.1.0 (50%) runs on there" in hook("canary", "status").stdout


@pytest.mark.parametrize(
    ("percent", "why"),
    [
        ("0", "canary=0: give the share of workers in percent, 1 to 99"),
        ("100", "canary=100: give the share of workers in percent, 1 to 99"),
        ("x", "canary=x: give the share"),
        ("51", "canary=51 of 2 worker(s) is all of them; at most canary=50"),
    ],
)
def test_a_canary_of_no_worker_or_of_all_is_refused(fleet, percent, why):
    work, bare = fleet
    release(work, "1.1.0")
    res = canary_push(work, percent)
    assert res.returncode != 0 and why in res.stderr, res.stderr
    assert not branch_exists(bare) and serving_on(bare, "there") == "1.0.0"


def test_a_canary_needs_two_workers_and_unknown_push_options_are_refused(prod):
    work, bare = prod
    assert git("config", "receive.advertisePushOptions", "true", cwd=bare).returncode == 0
    release(work, "1.1.0")
    res = canary_push(work, 50)
    assert res.returncode != 0 and "a canary needs at least 2 workers" in res.stderr, res.stderr
    res = git("push", "-o", "skip-gate", "production", "HEAD:main", cwd=work)
    assert res.returncode != 0 and "unknown push option skip-gate" in res.stderr, res.stderr
    assert serving(bare) == "1.0.0" and not branch_exists(bare)


def test_during_a_canary_pushes_and_rollbacks_are_refused_naming_it(fleet):
    work, bare = fleet
    release(work, "1.1.0")
    assert canary_push(work, 50).returncode == 0
    release(work, "1.2.0")
    for res in (push(work), canary_push(work, 50)):
        assert res.returncode != 0
        assert "while canary 1.1.0 (50%) runs on there since" in res.stderr, res.stderr
        assert "end it first: `modelserve-canary promote` or `abort` on here" in res.stderr
        assert "playbooks/canary.yml -e action=promote|abort" in res.stderr
    res = hook("rollback", "1.0.0")
    assert res.returncode != 0 and "a rollback while canary 1.1.0" in res.stdout
    assert "abort it first" in res.stdout
    assert serving_on(bare, "here") == "1.0.0" and serving_on(bare, "there") == "1.1.0"


def canary_then(work, bare, action, said, serves):
    """A canary of 1.1.0 on one worker of two, then `action`: it says `said`, both serve `serves`."""
    release(work, "1.1.0")
    assert canary_push(work, 50).returncode == 0
    res = hook("canary", action)
    assert res.returncode == 0 and said in res.stdout, res.stdout
    assert serving_on(bare, "here") == serving_on(bare, "there") == serves
    return state(bare)


def test_promote_serves_the_canary_everywhere_and_records_it(fleet):
    work, bare = fleet
    s = canary_then(
        work, bare, "promote", "promoted 1.1.0: every one of 2 host(s) confirmed it serves it", "1.1.0"
    )
    assert s["desired"] == "1.1.0" and s["history"] == ["1.1.0", "1.0.0"] and "canary" not in s
    assert s["action"] == "promote" and s["commit"] == git("rev-parse", "main", cwd=bare).stdout.strip()
    res = hook("canary", "promote")
    assert res.returncode != 0 and "no canary is running; production serves 1.1.0" in res.stdout
    release(work, "1.2.0")  # pushes are accepted again
    res = push(work)
    assert res.returncode == 0 and serving_on(bare, "there") == "1.2.0", res.stderr


def test_abort_puts_the_canary_hosts_back_on_the_stable_release(fleet):
    work, bare = fleet
    s = canary_then(work, bare, "abort", "aborted canary 1.1.0: there serve 1.0.0 again", "1.0.0")
    assert s["desired"] == "1.0.0" and "canary" not in s
    assert not (bare.parent / "state" / "releases" / "1.1.0").exists()  # never served: not kept
    assert "aborted canary 1.1.0, there back on 1.0.0" in (bare.parent / "deploy.log").read_text()
    release(work, "1.2.0")  # on top of the aborted commit
    assert canary_push(work, 50).returncode == 0 and serving_on(bare, "there") == "1.2.0"


def test_a_failed_canary_puts_its_hosts_back(fleet):
    work, bare = fleet
    add_workers(bare, "third")  # canary=50 of 3: there and third
    # third already holds a 1.1.0 whose model file rotted: its activation fails, after there's.
    rotten = bare.parent / "srv-third" / "releases" / "1.1.0"
    release(work, "1.1.0")
    shutil.copytree(work / "release", rotten)
    (rotten / "model.tflite").write_bytes(b"rot" * 100)
    res = canary_push(work, 50)
    assert res.returncode != 0
    assert "canary of 1.1.0 FAILED on third: activate failed" in res.stderr, res.stderr
    assert "every target is back on 1.0.0" in res.stderr
    assert [serving_on(bare, n) for n in ("here", "there", "third")] == ["1.0.0"] * 3
    assert "canary" not in state(bare) and not branch_exists(bare)


def test_sync_during_a_canary_keeps_it_on_its_hosts_and_gives_the_others_the_stable_release(fleet):
    work, bare = fleet
    release(work, "1.1.0")
    assert push(work).returncode == 0
    release(work, "1.2.0")
    assert canary_push(work, 50).returncode == 0
    # there was rebuilt (the seed only) and a new worker joined.
    srv = bare.parent / "srv-there"
    shutil.rmtree(srv)
    add_workers(bare, "there-again", "new")
    targets = [t for t in conf_of(bare)["targets"] if t["name"] != "there"]
    (bare.parent / "srv-there-again").rename(srv)
    targets[1].update(name="there", model_dir=str(srv))
    reconfigure(bare, targets=targets)
    res = hook("sync")
    assert res.returncode == 0, res.stdout
    assert [serving_on(bare, n) for n in ("here", "there", "new")] == ["1.1.0", "1.2.0", "1.1.0"]
    assert "new now serve 1.1.0, the desired release; there now serve 1.2.0, the canary" in res.stdout
    assert state(bare)["canary"]["hosts"] == ["there"]
    assert hook("canary", "abort").returncode == 0
    assert [serving_on(bare, n) for n in ("here", "there", "new")] == ["1.1.0"] * 3


# --- staged promotion: svt attests what it serves, prod takes exactly those bytes ---------------


@pytest.fixture
def stages(tmp_path):
    """Two environments side by side: svt takes pushes, prod takes only what svt served."""
    svt_work, svt = make_stage(tmp_path / "svt", "svt")
    _, prod_bare = make_stage(tmp_path / "prod", "prod", promote_from="svt")
    os.environ["MODELSERVE_DEPLOY_CONFIG"] = str(svt.parent / "deploy.json")  # pushes go to svt
    yield svt_work, svt, prod_bare
    os.environ.pop("MODELSERVE_DEPLOY_CONFIG", None)


def attest(svt: Path, *version: str):
    res = hook("attest", *version, bare=svt)
    outbox = svt.parent / "state" / "outbox"
    return res, outbox / "attestation.json", outbox / "release.tar"


def promote(prod_bare: Path, attestation: Path, archive: Path):
    return hook("promote", str(attestation), str(archive), bare=prod_bare)


def test_a_stage_with_an_earlier_one_refuses_pushes_naming_it(stages):
    work, _svt, prod_bare = stages
    release(work, "1.1.0")
    env = {**os.environ, "MODELSERVE_DEPLOY_CONFIG": str(prod_bare.parent / "deploy.json")}
    res = subprocess.run(
        ["git", "push", str(prod_bare), "HEAD:main"], cwd=work, capture_output=True, text=True, env=env
    )
    assert res.returncode != 0
    assert "prod takes releases only promoted from svt" in res.stderr, res.stderr
    assert "playbooks/promote.yml -i inventories/prod -e from=svt" in res.stderr
    assert serving(prod_bare) == "1.0.0" and not branch_exists(prod_bare)


def test_a_release_svt_serves_after_its_gate_reaches_prod_as_the_same_bytes(stages):
    work, svt, prod_bare = stages
    release(work, "1.1.0")
    assert push(work).returncode == 0
    res, attestation, archive = attest(svt)
    assert res.returncode == 0, res.stdout + res.stderr
    claim = json.loads(attestation.read_text())
    assert claim["environment"] == "svt" and claim["version"] == "1.1.0"
    assert claim["gate"]["rows"] > 0 and claim["workers"] == ["here"]
    res = promote(prod_bare, attestation, archive)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "prod serves 1.1.0, promoted from svt" in res.stdout
    assert serving(prod_bare) == "1.1.0"
    digests = {hook_digest(bare.parent / "state" / "releases" / "1.1.0") for bare in (svt, prod_bare)} | {
        hook_digest(prod_bare.parent / "srv" / "releases" / "1.1.0"),
        claim["digest"],
    }
    assert len(digests) == 1, digests
    record = state(prod_bare)["records"]["1.1.0"]
    assert record["promoted_from"]["environment"] == "svt" and record["digest"] == claim["digest"]
    assert record["gate"]["rows"] > 0  # prod's own gate measured it too
    again = promote(prod_bare, *attest(svt)[1:])  # a re-run changes nothing
    assert again.returncode == 0 and "prod already serves 1.1.0" in again.stdout, again.stdout


def hook_digest(release_dir: Path) -> str:
    res = subprocess.run(
        [str(Path(sys.executable).parent / "modelserve-release"), "digest", str(release_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    return res.stdout.split()[0]


@pytest.mark.parametrize(
    ("version", "why"),
    [
        ("9.9.9", "stage svt does not serve 9.9.9; it serves 1.1.0"),
        ("1.0.0", "stage svt does not serve 1.0.0 (it did before); it serves 1.1.0"),
    ],
)
def test_a_release_svt_does_not_serve_is_refused_naming_the_stage(stages, version, why):
    work, svt, prod_bare = stages
    release(work, "1.1.0")
    assert push(work).returncode == 0
    res, attestation, _ = attest(svt, version)
    assert res.returncode == 1 and why in res.stdout, res.stdout
    assert not attestation.exists() and serving(prod_bare) == "1.0.0"


def test_the_seed_svt_never_gated_is_not_attested(stages):
    _work, svt, _prod = stages
    res, attestation, _ = attest(svt)
    assert res.returncode == 1 and "stage svt has no release record: nothing was ever deployed" in res.stdout
    assert not attestation.exists()


def test_a_promotion_is_refused_before_svt_served_it_long_enough(stages):
    work, svt, prod_bare = stages
    reconfigure(prod_bare, promote_soak=3600)
    release(work, "1.1.0")
    assert push(work).returncode == 0
    res = promote(prod_bare, *attest(svt)[1:])
    assert res.returncode == 1
    assert "stage svt has served 1.1.0 for" in res.stdout
    assert "prod takes a release after 3600 s" in res.stdout
    assert serving(prod_bare) == "1.0.0"


def test_other_bytes_than_svt_served_are_refused(stages, tmp_path):
    work, svt, prod_bare = stages
    release(work, "1.1.0")
    assert push(work).returncode == 0
    _, attestation, archive = attest(svt)
    forged = tmp_path / "forged"
    shutil.unpack_archive(archive, forged, "tar")
    meta = forged / "release" / "metadata.json"
    meta.chmod(0o644)
    meta.write_text(meta.read_text().replace('"heldout_accuracy"', '"heldout_accuracy" ', 1))
    shutil.make_archive(str(tmp_path / "forged"), "tar", forged)
    res = promote(prod_bare, attestation, tmp_path / "forged.tar")
    assert res.returncode == 1 and "not the bytes stage svt served" in res.stdout, res.stdout
    assert serving(prod_bare) == "1.0.0"
    assert "1.1.0" not in os.listdir(prod_bare.parent / "state" / "releases")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"environment": "dev"}, "prod takes releases only from stage svt; this one comes from dev"),
        ({"attested_at": "2020-01-01T00:00:00+00:00"}, "old; attest again"),
    ],
)
def test_an_attestation_from_another_stage_or_too_old_is_refused(stages, change, why):
    work, svt, prod_bare = stages
    release(work, "1.1.0")
    assert push(work).returncode == 0
    _, attestation, archive = attest(svt)
    attestation.write_text(json.dumps({**json.loads(attestation.read_text()), **change}))
    res = promote(prod_bare, attestation, archive)
    assert res.returncode == 1 and why in res.stdout, res.stdout
    assert serving(prod_bare) == "1.0.0"
