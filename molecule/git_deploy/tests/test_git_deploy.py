"""Model delivery by git push, end to end, with real SSH from the development host to production.

The tests run in file order and build on each other: a good release is pushed and served, bad
pushes are refused while production keeps serving it, another branch deploys nothing, and a
rollback restores the previous release. Then the fleet's guarantees: a push with a worker down is
refused untouched, a failed activation on one worker puts every worker back, of two concurrent
pushes the second waits and is refused with the reason, a rebuilt worker gets the desired release
from site.yml's delivery play, and a rollback to a named release reaches a worker that never had it.
Last, canary releases: one worker of two serves a new release beside the stable one, a push is
refused meanwhile, and promote and abort switch under a steady load without one failed request.
"""

import json
import os
import re
import shlex
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import testinfra.utils.ansible_runner

runner = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
WORKDIR = "/home/mlops/models"
WORKERS = ("gd-worker1", "gd-worker2")
STATE = "/srv/git/release-state"
ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY") or Path(__file__).resolve().parents[3])


def host(name):
    return runner.get_host(name)


@pytest.fixture(scope="module")
def url():
    return f"http://{host('gd-frontend').interface('eth0').addresses[0]}:8080"


def served(url):
    return requests.get(f"{url}/api/v1/model", timeout=5).json()["version"]


def served_within(url, version, seconds=10):
    """What the front end reports once it reports `version`, or after `seconds`: its fleet view
    follows the workers' status messages (sent on a change, checked every couple of seconds)."""
    deadline = time.monotonic() + seconds
    while (now := served(url)) != version and time.monotonic() < deadline:
        time.sleep(0.25)
    return now


def dev(cmd):
    """Run a shell command as the data scientist in the training project."""
    return host("gd-dev").run(f"su - mlops -c {shlex.quote(f'cd {WORKDIR} && {cmd}')}")


def push(ref="main"):
    return dev(f"git push production HEAD:{ref} 2>&1")


def commit_release(version, *, tamper=""):
    """Make a release of `version` from the current one without retraining, optionally broken."""
    out = dev(
        "python3 - <<'EOF'\n"
        "import hashlib, json, pathlib\n"
        "rel = pathlib.Path('release')\n"
        "meta = json.loads((rel / 'metadata.json').read_text())\n"
        f"meta['version'] = {version!r}\n"
        f"tamper = {tamper!r}\n"
        "if tamper == 'corrupt-model':\n"
        "    (rel / 'model.tflite').write_bytes(b'not a model' * 100)\n"
        "    # checksums updated too: only loading the model can tell\n"
        "    data = (rel / 'model.tflite').read_bytes()\n"
        "    digest = hashlib.sha256(data).hexdigest()\n"
        "    meta['files']['model.tflite'] = {'sha256': digest, 'bytes': len(data)}\n"
        "(rel / 'metadata.json').write_text(json.dumps(meta, indent=2))\n"
        "EOF\n"
        f"git add -A && git commit -q -m 'release {version} {tamper}'"
    )
    assert out.rc == 0, out.stderr


def test_development_host_trusts_production_by_its_real_host_key():
    known = host("gd-dev").file("/home/mlops/.ssh/known_hosts").content_string
    real = host("gd-worker1").file("/etc/ssh/ssh_host_ed25519_key.pub").content_string.split()[1]
    assert real in known
    # host key checking stays on: ssh config does not disable it
    assert "StrictHostKeyChecking no" not in host("gd-dev").run("cat /etc/ssh/ssh_config").stdout


def test_deploy_user_has_no_shell_beyond_deploying():
    out = dev("ssh -o BatchMode=yes deploy@gd-worker1 id 2>&1")
    assert out.rc != 0 and "refused" in out.stdout
    sudoers = host("gd-worker1").file("/etc/sudoers.d/modelserve-deploy").content_string
    assert "NOPASSWD: ALL" not in sudoers and "modelserve-release" in sudoers


def test_trained_release_pushed_is_served_within_10_s_without_failed_requests(url):
    assert served(url) == "1.0.0"
    out = dev("sed -i 's/^MODEL_VERSION=.*/MODEL_VERSION=1.1.0/' params.env && ./train.sh")
    assert out.rc == 0, out.stdout + out.stderr
    assert dev("git add -A && git commit -q -m 'Model 1.1.0'").rc == 0

    failures, answered, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            r = requests.post(f"{url}/api/v1/predict", json={"rows": [ROW]}, timeout=10)
            (answered if r.status_code == 200 else failures).append(r.status_code)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        t0 = time.monotonic()
        out = push()
        assert out.rc == 0, out.stdout
        while served(url) != "1.1.0" and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        took = time.monotonic() - t0
        time.sleep(1)
    finally:
        stop.set()
        loader.join()
    assert served(url) == "1.1.0", f"not served after {took:.1f} s: {out.stdout}"
    assert took <= 10
    assert not failures, f"{len(failures)} failed requests during the deploy: {failures[:5]}"
    assert len(answered) > 10
    for w in ("gd-worker1", "gd-worker2"):  # the push landed on one host; every worker got it
        assert host(w).file("/srv/modelserve/current").linked_to.endswith("releases/1.1.0")


def test_broken_model_is_refused_and_production_keeps_serving(url):
    commit_release("1.2.0", tamper="corrupt-model")
    out = push()
    assert out.rc != 0
    assert "REJECTED" in out.stdout and "model.tflite" in out.stdout
    assert served(url) == "1.1.0"
    assert dev("git reset -q --hard HEAD~1").rc == 0


def test_lower_version_is_refused(url):
    commit_release("1.0.5")
    out = push()
    assert out.rc != 0
    assert "not higher than the served 1.1.0" in out.stdout
    assert served(url) == "1.1.0"
    assert dev("git reset -q --hard HEAD~1").rc == 0


def test_forged_metrics_of_a_one_epoch_model_are_refused_by_the_sandboxed_gate(url):
    # As a data scientist would: train for one epoch, then claim excellent figures in the metadata.
    out = dev(
        "sed -i 's/^MODEL_VERSION=.*/MODEL_VERSION=1.3.0/; s/^EPOCHS=.*/EPOCHS=1/' params.env && ./train.sh"
        " && python3 -c \"import json, pathlib; p = pathlib.Path('release/metadata.json'); m = json.loads("
        "p.read_text()); m['metrics'].update(heldout_accuracy=0.99, heldout_auc=0.99); "
        "p.write_text(json.dumps(m))\" && git add -A && git commit -q -m 'forged 1.3.0'"
    )
    assert out.rc == 0, out.stdout + out.stderr
    out = push()
    assert dev("git reset -q --hard HEAD~1").rc == 0
    assert out.rc != 0
    assert "release 1.3.0 measured on production's 765 evaluation rows" in out.stdout, out.stdout
    assert "is below the floor" in out.stdout and "the gate ignores claims" in out.stdout
    assert served(url) == "1.1.0"
    assert host("gd-worker1").run(f"ls -A {STATE}/staging").stdout.strip() == ""


def test_the_gate_sandbox_measures_only_releases_production_staged(url):
    w1 = host("gd-worker1")
    as_deploy = "runuser -u deploy -- "
    gate = f"{as_deploy}sudo -n /usr/local/sbin/modelserve-gate --against"
    ok = w1.run(f"{gate} {STATE}/releases/1.1.0 {STATE}/releases/1.1.0")
    assert ok.rc == 0, ok.stderr
    figures = json.loads(ok.stdout.strip().splitlines()[-1])
    assert figures["candidate"] == figures["served"] and figures["candidate"]["rows"] == 765
    bad = w1.run(
        f"{as_deploy}sudo -n /usr/local/sbin/modelserve-gate --against /srv/modelserve/current /root"
    )
    assert bad.rc == 2 and "neither in the release store nor in the staging area" in bad.stderr
    # The deploy account itself cannot read production's evaluation data; only the gate gets it.
    assert w1.run(f"{as_deploy}cat /etc/modelserve-deploy/eval.csv").rc != 0


def test_an_oversize_push_is_refused_by_git_before_anything_is_unpacked(url):
    out = dev("head -c 60000000 /dev/urandom > release/notes.bin && git add -A && git commit -q -m big")
    assert out.rc == 0, out.stderr
    out = push()
    assert dev("git reset -q --hard HEAD~1").rc == 0
    assert out.rc != 0
    assert "pack exceeds maximum allowed size" in out.stdout, out.stdout
    assert served(url) == "1.1.0"
    objects = host("gd-worker1").run("du -sm /srv/git/models.git/objects").stdout.split()[0]
    assert int(objects) < 40, f"{objects} MiB of objects kept from a refused push"


def test_push_to_another_branch_deploys_nothing(url):
    commit_release("2.0.0")
    out = push("experiment")
    assert out.rc == 0, out.stdout
    assert "stored, not deployed" in out.stdout
    time.sleep(2)
    assert served(url) == "1.1.0"
    assert dev("git reset -q --hard HEAD~1").rc == 0


def test_rollback_restores_the_previous_release(url):
    out = host("gd-worker1").run("/usr/local/sbin/modelserve-rollback")
    assert out.rc == 0, out.stdout + out.stderr
    assert served(url) == "1.0.0"
    for w in ("gd-worker1", "gd-worker2"):
        assert host(w).file("/srv/modelserve/current").linked_to.endswith("releases/1.0.0")
    log = host("gd-worker1").file("/var/log/modelserve-deploy.log").content_string
    assert "deployed 1.1.0" in log and "rolled back 1.1.0 -> 1.0.0" in log


# --- the fleet: one desired release, all or nothing, one change at a time ------------------------


def serving(version):
    """Every worker's own `current` and the front end agree on `version`."""
    for w in WORKERS:
        assert host(w).file("/srv/modelserve/current").linked_to.endswith(f"releases/{version}"), w
    return True


def desired():
    return json.loads(host("gd-worker1").file(f"{STATE}/state.json").content_string)


def playbook(name, *args):
    """Run one of the collection's playbooks on this scenario's hosts, as a user would (-v: with
    the commands' output)."""
    inventory = str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)  # with its group_vars
    cmd = ["ansible-playbook", "-v", "-i", inventory, str(ROOT / "playbooks" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)


def test_production_records_the_release_it_serves(url):
    state = desired()
    assert state["desired"] == served(url) == "1.0.0"
    assert state["history"][:3] == ["1.0.0", "1.1.0", "1.0.0"]


def test_push_with_a_worker_unreachable_is_refused_before_anything_changes(url):
    commit_release("1.2.0")  # kept for the next tests
    w2 = host("gd-worker2")
    assert w2.run("systemctl stop ssh.socket ssh.service").rc == 0  # new connections refused
    try:
        out = push()
    finally:
        assert w2.run("systemctl start ssh.service").rc == 0
    assert out.rc != 0
    assert "REJECTED: gd-worker2: current failed" in out.stdout, out.stdout
    assert "nothing was changed" in out.stdout
    assert served(url) == "1.0.0" and serving("1.0.0")
    assert not host("gd-worker1").file("/srv/modelserve/releases/1.2.0").exists


def test_failed_activation_on_one_worker_puts_every_worker_back(url):
    w2 = host("gd-worker2")
    owner = w2.run("stat -c %U:%G /srv/modelserve").stdout.strip()
    # The worker's model directory no longer takes the new link: its activation fails, after
    # gd-worker1 (first) already switched.
    assert w2.run("chown root:root /srv/modelserve").rc == 0
    try:
        out = push()
    finally:
        assert w2.run(f"chown {owner} /srv/modelserve").rc == 0
    assert out.rc != 0
    assert "deploy of 1.2.0 FAILED on gd-worker2: activate failed" in out.stdout, out.stdout
    assert "Permission denied" in out.stdout and "every target is back on 1.0.0" in out.stdout
    assert serving("1.0.0") and served_within(url, "1.0.0") == "1.0.0"
    assert desired()["desired"] == "1.0.0"
    log = host("gd-worker1").file("/var/log/modelserve-deploy.log").content_string
    assert "FAILED 1.2.0" in log and "gd-worker2" in log


def test_the_same_push_deploys_once_the_cause_is_gone(url):
    out = push()  # refused pushes did not move the branch: the same commit goes again
    assert out.rc == 0, out.stdout
    assert "each confirmed it serves it" in out.stdout
    assert served(url) == "1.2.0" and serving("1.2.0")


def test_of_two_concurrent_pushes_the_second_waits_then_is_refused_with_the_reason(url):
    # The second push is a release made on top of 1.2.0 in another clone, ready before the first.
    second = "/home/mlops/second"
    commit_release("1.3.0")
    first_sha = dev("git rev-parse HEAD").stdout.strip()
    out = dev(
        f"rm -rf {second} && git clone -q . {second} && cd {second} && git reset -q --hard HEAD~1"
        ' && git remote add production "$(git -C ~/models remote get-url production)"'
        ' && sed -i \'s/"version": "1.2.0"/"version": "1.4.0"/\' release/metadata.json'
        " && git commit -qam 'release 1.4.0'"
    )
    assert out.rc == 0, out.stdout + out.stderr
    # The first deploy is paused as soon as it holds the lock (a deploy takes ~2 s: too short to
    # race from here), by a watcher on the repository host, and resumed once the second push has
    # said it waits.
    w1 = host("gd-worker1")
    hook = "pkill -{} -f '[d]eploy_hook.py pre-receive'"  # [d]: never the shell running pkill
    watcher = (
        f"rm -f /tmp/paused; for i in $(seq 600); do grep -qs {first_sha[:12]} {STATE}/lock.info"
        f" && {hook.format('STOP')} && echo paused > /tmp/paused && exit 0; sleep 0.05; done"
    )
    assert w1.run(f"setsid -f sh -c {shlex.quote(watcher)}").rc == 0
    assert dev("setsid -f sh -c 'git push production HEAD:main > /tmp/first-push.log 2>&1'").rc == 0
    log = "/tmp/second-push.log"
    for _ in range(150):
        if w1.file("/tmp/paused").exists:
            break
        time.sleep(0.2)
    else:
        w1.run(hook.format("CONT"))
        pytest.fail("the first push was never seen holding the change lock")
    try:
        second_push = f"git push production HEAD:main > {log} 2>&1; echo rc=$? >> {log}"
        assert dev(f"cd {second} && setsid -f sh -c '{second_push}'").rc == 0
        for _ in range(100):
            said = host("gd-dev").file(log)
            if said.exists and "waiting up to" in said.content_string:
                break
            time.sleep(0.2)
    finally:
        assert host("gd-worker1").run(hook.format("CONT")).rc == 0
    for _ in range(300):
        first = host("gd-dev").file("/tmp/first-push.log").content_string
        second_log = host("gd-dev").file(log).content_string
        if ("deployed 1.3.0" in first or "REJECTED" in first) and "rc=" in second_log:
            break
        time.sleep(0.2)
    assert "deployed 1.3.0" in first, first
    assert "rc=0" not in second_log, second_log
    assert f"waiting up to 60 s for the push of {first_sha[:12]}" in second_log, second_log
    assert "moved to" in second_log and "while this push waited" in second_log
    assert served(url) == "1.3.0" and serving("1.3.0")


def test_a_rebuilt_worker_serves_the_desired_release_after_site_delivery_play(url):
    w2 = host("gd-worker2")
    # gd-worker2 as model_serving leaves a new host: the seed release only, served.
    out = w2.run(
        "cd /srv/modelserve && rm -f previous && ln -sfn releases/1.0.0 .current.new"
        " && mv -T .current.new current && find releases -mindepth 1 -maxdepth 1"
        " ! -name 1.0.0 -exec rm -rf {} +"
    )
    assert out.rc == 0, out.stderr
    res = playbook("cicd.yml", "--limit", "workers")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "gd-worker2 now serve 1.3.0" in res.stdout
    assert serving("1.3.0")
    time.sleep(2)  # each worker process looks at `current` again within its check interval
    answers = {requests.get(f"{url}/api/v1/model", timeout=5).json()["version"] for _ in range(20)}
    assert answers == {"1.3.0"}  # one API, one model
    res = playbook("cicd.yml", "--limit", "workers")  # a second run changes nothing
    assert res.returncode == 0 and "every target serves 1.3.0" in res.stdout


def test_rollback_to_a_named_release_reaches_a_worker_that_never_had_it(url):
    assert not host("gd-worker2").file("/srv/modelserve/releases/1.2.0").exists
    res = playbook("rollback.yml", "-e", "version=1.2.0")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "rolled back from 1.3.0 to 1.2.0" in res.stdout
    assert served(url) == "1.2.0" and serving("1.2.0")
    assert desired()["desired"] == "1.2.0"
    res = playbook("rollback.yml", "-e", "version=0.0.9")  # not in the store: refused, unchanged
    assert res.returncode != 0
    assert "release 0.0.9 is not in the release store" in res.stdout + res.stderr  # fatal: on stderr
    assert served(url) == "1.2.0" and serving("1.2.0")


# --- canary releases: one of the two workers serves the new release, then promote or abort ------


class Load:
    """Steady predictions from a few threads while a change runs; answers counted per version (the
    X-Model-Version header), failures kept. Bounded: each thread stops after `limit` seconds."""

    def __init__(self, url, threads=4, limit=300):
        self.url, self.limit = url, limit
        self.versions, self.failures, self.sent = Counter(), [], 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self):
        end = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                r = requests.post(f"{self.url}/api/v1/predict", json={"rows": [ROW]}, timeout=10)
                ok, what = r.status_code == 200, r.headers.get("X-Model-Version") or r.status_code
            except requests.RequestException as exc:
                ok, what = False, repr(exc)
            with self.lock:
                self.sent += 1
                if ok:
                    self.versions[what] += 1
                else:
                    self.failures.append(what)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def answers(url, n=20):
    """Versions named by `n` prediction answers, by their header."""
    return Counter(
        requests.post(f"{url}/api/v1/predict", json={"rows": [ROW]}, timeout=10).headers["X-Model-Version"]
        for _ in range(n)
    )


def report(capsys, what, load):
    with capsys.disabled():  # the figures in the scenario's output, not only on a failure
        print(f"\n{what} under load: {load.sent} sent, {len(load.failures)} failed, {dict(load.versions)}")


def canary_push(percent):
    return dev(f"git push -o canary={percent} production HEAD:main 2>&1")


def test_a_canary_push_serves_the_new_release_on_one_of_two_workers(url):
    commit_release("1.5.0")
    out = canary_push(50)
    assert out.rc == 0, out.stdout
    assert "canary 1.5.0 installed on 2 host(s), served by gd-worker2" in out.stdout, out.stdout
    assert "the others keep serving 1.2.0" in out.stdout and "modelserve-canary promote" in out.stdout
    w1, w2 = (host(w).file("/srv/modelserve/current").linked_to for w in WORKERS)
    assert w1.endswith("releases/1.2.0") and w2.endswith("releases/1.5.0")
    assert host("gd-worker1").file("/srv/modelserve/releases/1.5.0/model.tflite").exists  # installed
    state = desired()
    assert state["desired"] == "1.2.0" and state["canary"]["hosts"] == ["gd-worker2"]
    time.sleep(2)  # each worker process looks at `current` again within its check interval
    with Load(url) as load:  # both versions answer the one API, each answer says which
        for _ in range(100):
            if min(load.versions["1.2.0"], load.versions["1.5.0"]) >= 10:
                break
            time.sleep(0.2)
    assert not load.failures, load.failures[:5]
    assert load.versions["1.2.0"] >= 10 and load.versions["1.5.0"] >= 10, load.versions
    status = host("gd-worker1").run("/usr/local/sbin/modelserve-canary status")
    assert status.rc == 0 and "canary 1.5.0 (50%) runs on gd-worker2" in status.stdout, status.stdout


def test_a_push_during_a_canary_is_refused_naming_it(url):
    commit_release("1.6.0")
    out = push()
    assert dev("git reset -q --hard HEAD~1").rc == 0
    assert out.rc != 0
    assert "a push to main while canary 1.5.0 (50%) runs on gd-worker2" in out.stdout, out.stdout
    assert "`modelserve-canary promote` or `abort` on gd-worker1" in out.stdout
    assert desired()["canary"]["version"] == "1.5.0"
    res = playbook("rollback.yml")
    assert res.returncode != 0 and "abort it first" in res.stdout + res.stderr


def test_promote_under_steady_load_fails_no_request(url, capsys):
    with Load(url) as load:
        res = playbook("canary.yml", "-e", "action=promote")
        time.sleep(3)  # answers from both workers after the switch
    assert res.returncode == 0, res.stdout[-3000:]
    assert "promoted 1.5.0: every one of 2 host(s) confirmed it serves it" in res.stdout
    report(capsys, "promote", load)
    assert load.sent > 20 and not load.failures, load.failures[:5]
    assert serving("1.5.0") and answers(url) == {"1.5.0": 20}
    state = desired()
    assert (
        state["desired"] == "1.5.0" and "canary" not in state and state["history"][:2] == ["1.5.0", "1.2.0"]
    )


def test_abort_under_steady_load_fails_no_request(url, capsys):
    commit_release("1.6.0")
    out = canary_push(50)
    assert out.rc == 0, out.stdout
    time.sleep(2)
    with Load(url) as load:
        time.sleep(2)
        out = host("gd-worker1").run("/usr/local/sbin/modelserve-canary abort")
        time.sleep(3)
    assert out.rc == 0, out.stdout + out.stderr
    assert "aborted canary 1.6.0: gd-worker2 serve 1.5.0 again" in out.stdout
    report(capsys, "abort", load)
    assert load.sent > 20 and not load.failures, load.failures[:5]
    assert load.versions["1.6.0"] > 0, load.versions  # the canary answered before the abort
    assert serving("1.5.0") and answers(url) == {"1.5.0": 20}
    assert "canary" not in desired() and desired()["desired"] == "1.5.0"


def test_every_host_is_tidy_after_the_deploys():
    for w in WORKERS:
        assert host(w).run("ls -A /var/lib/modelserve-deploy").stdout.strip() == "", w  # no incoming copies
        releases = host(w).run("ls /srv/modelserve/releases").stdout.split()
        assert 0 < len(releases) <= 5, (w, releases)  # git_deploy_releases_keep
    w1 = host("gd-worker1")
    assert w1.run(f"ls -A {STATE}/staging").stdout.strip() == ""
    rotate = w1.run("logrotate -d /etc/logrotate.d/modelserve-deploy")
    assert rotate.rc == 0 and "/var/log/modelserve-deploy.log" in rotate.stderr + rotate.stdout


def test_the_fan_out_key_only_writes_releases_into_the_incoming_directory():
    w1, w2 = host("gd-worker1"), host("gd-worker2")
    as_deploy = "runuser -u deploy -- "
    ssh = "ssh -o BatchMode=yes deploy@gd-worker2"
    out = w1.run(
        f"{as_deploy}rsync -a -e 'ssh -o BatchMode=yes' /etc/hostname deploy@gd-worker2:/etc/fanout-probe"
    )
    assert not w2.file("/etc/fanout-probe").exists, out.stdout + out.stderr
    out = w1.run(f"{as_deploy}rsync -a -e 'ssh -o BatchMode=yes' deploy@gd-worker2:../ /tmp/fanout-read/")
    assert out.rc != 0 and not w1.file("/tmp/fanout-read/.ssh").exists  # write-only: nothing read back
    for command in ("rollback", "prune --keep 1", "activate ../../etc", "current; id"):
        out = w1.run(f"{as_deploy}{ssh} {shlex.quote(command)}")
        assert out.rc != 0 and "refused over SSH" in out.stderr, command


def test_releases_are_read_only_to_the_serving_services():
    for name, unit in [(w, "modelserve-worker@1") for w in WORKERS] + [("gd-frontend", "modelserve-web")]:
        pid = host(name).run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
        assert pid not in ("", "0"), (name, unit)
        # The running service's own mount table: the mount the model directory lies on there (its
        # own ReadOnlyPaths bind mount, or ProtectSystem=strict's read-only root) is read-only.
        mounts = [m.split() for m in host(name).file(f"/proc/{pid}/mountinfo").content_string.splitlines()]
        covering = [
            (len(m[4]), i, m)
            for i, m in enumerate(mounts)
            if "/srv/modelserve/".startswith(m[4].rstrip("/") + "/")
        ]
        assert covering, (name, unit)
        mount = max(covering)[2]  # the deepest mount point; of mounts stacked on it, the last
        assert mount[5].split(",")[0] == "ro", (name, unit, mount)
    for w in WORKERS:
        current = host(w).file("/srv/modelserve/current").linked_to
        assert host(w).file(f"{current}/model.tflite").mode == 0o444
        assert host(w).file(current).mode == 0o555


def test_site_yml_after_the_deploys_changes_nothing():
    # By now the workers pruned the seed release (git_deploy_releases_keep): a re-run must neither
    # copy it back nor move any release.
    assert any(not host(w).file("/srv/modelserve/releases/1.0.0").exists for w in WORKERS)
    inventory = str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
    res = subprocess.run(
        ["ansible-playbook", "-i", inventory, str(ROOT / "site.yml")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    recap = [line for line in res.stdout.splitlines() if " : ok=" in line]
    assert recap and all(" changed=0 " in line for line in recap), "\n".join(recap)


# --- staged promotion: this scenario's environment is `svt`; prod-stage/ is a `prod` beside it ----

SCENARIO = Path(__file__).resolve().parents[1]
PROD_INVENTORY = str(SCENARIO / "prod-stage")
APP_CLI = "/opt/modelserve/venv/bin/modelserve-release --model-dir /srv/modelserve"


def run(*cmd, timeout=900):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


def promote(*args):
    """playbooks/promote.yml against prod, taking the release from this scenario's inventory."""
    svt = str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
    book = str(ROOT / "playbooks" / "promote.yml")
    return run("ansible-playbook", "-v", "-i", PROD_INVENTORY, book, "-e", f"from={svt}", *args)


def prod_host():
    return testinfra.get_host("docker://gd-prod")


@pytest.fixture(scope="module")
def prod_url():
    """The prod environment: its container started and configured by site.yml, removed at the end."""
    stage = str(SCENARIO / "prod-stage.yml")
    res = run("ansible-playbook", stage, "-e", "stage_state=present")
    assert res.returncode == 0, res.stdout[-3000:]
    try:
        res = run("ansible-playbook", "-i", PROD_INVENTORY, str(ROOT / "site.yml"), timeout=1500)
        assert res.returncode == 0, res.stdout[-3000:]
        yield f"http://{prod_host().interface('eth0').addresses[0]}:8080"
    finally:
        run("ansible-playbook", stage, "-e", "stage_state=absent")


def test_a_push_to_prod_is_refused_naming_the_stage_it_takes_releases_from(prod_url):
    out = prod_host().run(
        'runuser -u deploy -- sh -c \'cd "$(mktemp -d)" && git init -q && '
        "git -c user.name=t -c user.email=t@example.invalid commit -q --allow-empty -m x && "
        "git push /srv/git/models.git HEAD:main 2>&1'"
    )
    assert out.rc != 0, out.stdout
    assert "prod takes releases only promoted from svt" in out.stdout, out.stdout
    assert "playbooks/promote.yml -i inventories/prod -e from=svt" in out.stdout
    assert served(prod_url) == "1.0.0"


def test_a_promotion_of_a_release_svt_never_served_is_refused(prod_url):
    res = promote("-e", "version=1.6.0")  # svt had it as a canary only, aborted
    assert res.returncode != 0
    assert "stage svt does not serve 1.6.0; it serves 1.5.0" in res.stdout, res.stdout[-3000:]
    assert served(prod_url) == "1.0.0"


def test_prod_takes_what_svt_served_long_enough_as_the_same_bytes_under_load(prod_url, capsys):
    commit_release("1.7.0")
    out = push()
    assert out.rc == 0, out.stdout
    pushed = time.monotonic()
    res = promote()  # svt has served it for seconds; prod asks 60
    assert res.returncode != 0
    assert "stage svt has served 1.7.0 for" in res.stdout, res.stdout[-3000:]
    assert "prod takes a release after 60 s" in res.stdout
    assert served(prod_url) == "1.0.0"
    time.sleep(max(0.0, pushed + 62 - time.monotonic()))
    with Load(prod_url) as load:
        res = promote()
        time.sleep(2)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "prod serves 1.7.0, promoted from svt" in res.stdout
    report(capsys, "promotion svt -> prod", load)
    assert load.sent > 20 and not load.failures, load.failures[:5]
    assert served(prod_url) == "1.7.0" and load.versions["1.7.0"] > 0
    digests = {
        name: h.run(f"{APP_CLI} digest 1.7.0").stdout.split()[0]
        for name, h in (("gd-prod", prod_host()), *((w, host(w)) for w in WORKERS))
    }
    assert len(set(digests.values())) == 1, digests
    record = json.loads(prod_host().file(f"{STATE}/state.json").content_string)["records"]["1.7.0"]
    assert record["digest"] == digests["gd-prod"] and record["promoted_from"]["environment"] == "svt"
    again = promote()  # nothing to do: the same bytes are served
    assert again.returncode == 0, again.stdout[-3000:]
    assert "prod already serves 1.7.0" in again.stdout
    recap = [line for line in again.stdout.splitlines() if re.match(r"\S+ +: ok=", line)]  # not -v's
    assert {line.split()[0] for line in recap} == {"gd-prod", "localhost"}, "\n".join(recap)
    assert all(" changed=0 " in line for line in recap), "\n".join(recap)
