"""Model delivery by git push, end to end, with real SSH from the development host to production.

The tests run in file order and build on each other: a good release is pushed and served, bad
pushes are refused while production keeps serving it, another branch deploys nothing, and a
rollback restores the previous release.
"""

import os
import shlex
import threading
import time

import pytest
import requests
import testinfra.utils.ansible_runner

runner = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
WORKDIR = "/home/mlops/models"


def host(name):
    return runner.get_host(name)


@pytest.fixture(scope="module")
def url():
    return f"http://{host('gd-frontend').interface('eth0').addresses[0]}:8080"


def served(url):
    return requests.get(f"{url}/api/v1/model", timeout=5).json()["version"]


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
