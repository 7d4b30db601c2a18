"""scripts/test (what .ci/run runs) fails when any stage fails, and says so.

The real script runs in a scratch copy of the repository layout whose tools are test doubles:
`scripts/bootstrap`, `yamllint`, `ansible-lint`, `ruff`, `molecule`, `python -m pytest` and the
local-cluster stage's `scripts/local-cluster`, `docker`, `curl` and `ansible-playbook` are stubs
that exit with the code (or report the figure) the test asks for; everything else is the real script.
"""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

STUB = "#!/bin/sh\n{body}\n"


def _stub(path: Path, body: str) -> None:
    path.write_text(STUB.format(body=body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_repo(tmp_path):
    (tmp_path / "scripts").mkdir()
    for script in ("test", "recap-changed"):  # the real scripts under test
        shutil.copy(ROOT / "scripts" / script, tmp_path / "scripts" / script)
    _stub(tmp_path / "scripts" / "bootstrap", "exit 0")
    for d in ("app/tests", "app/edge/tests", "tests"):
        (tmp_path / d).mkdir(parents=True)
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    for tool in ("yamllint", "ansible-lint", "ruff"):
        _stub(venv / tool, 'exit "${FAKE_LINT_RC:-0}"')
    _stub(venv / "molecule", 'echo "molecule $*"; exit "${FAKE_MOLECULE_RC:-0}"')
    _stub(tmp_path / "scripts" / "local-cluster", 'echo "$*" >>"$0.calls"; exit "${FAKE_LOCAL_RC:-0}"')
    _stub(venv / "docker", "exit 0")
    _stub(venv / "curl", 'echo "${FAKE_HTTP_CODE:-200}"')
    _stub(
        venv / "ansible-playbook",
        'echo "PLAY RECAP ***"; echo "ms-broker : ok=5 changed=${FAKE_CHANGED:-0} unreachable=0 failed=0"',
    )
    # `python -m pytest` is the double; the script's own summary (`python - DIR`) is real Python.
    _stub(
        venv / "python",
        'if [ "$1" = -m ] && [ "$2" = pytest ]; then exit "${FAKE_PYTEST_RC:-0}"; fi\n'
        f'exec {sys.executable} "$@"',
    )
    return tmp_path


def run(repo: Path, **rcs: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{f"FAKE_{k.upper()}_RC": str(v) for k, v in rcs.items()})
    return subprocess.run(
        ["bash", repo / "scripts" / "test", "all"], env=env, capture_output=True, text=True, timeout=120
    )


def test_all_stages_pass(fake_repo):
    res = run(fake_repo)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^jobs: \d+ passed, 0 failed$", res.stdout, re.M), res.stdout


@pytest.mark.parametrize("stage", ["lint", "pytest", "molecule", "local"])
def test_one_failing_stage_fails_the_run(fake_repo, stage):
    res = run(fake_repo, **{stage: 1})
    assert res.returncode != 0, f"{stage} failed but scripts/test exited 0:\n{res.stdout}"
    assert "scripts/test: FAILED" in res.stderr
    # the failing job is named, with its log; every other job still ran to its end (docker is last)
    failing = "docker" if stage == "molecule" else stage
    assert re.search(rf"^==> {failing}: FAILED after \d+ s; its log:$", res.stdout, re.M), res.stdout
    assert re.search(r"^==> docker: (ok in|FAILED after) \d+ s", res.stdout, re.M), res.stdout


@pytest.mark.parametrize("fault", [{"http_code": 503}, {"changed": 2}])
def test_local_stage_fails_on_a_bad_prediction_or_a_changing_rerun(fake_repo, fault):
    env = dict(os.environ, **{f"FAKE_{k.upper()}": str(v) for k, v in fault.items()})
    res = subprocess.run(
        ["bash", fake_repo / "scripts" / "test", "local"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0, res.stdout + res.stderr
    assert "local cluster: FAILED" in res.stdout
    # the cluster this stage started is removed again, failed or not
    calls = (fake_repo / "scripts" / "local-cluster.calls").read_text().split()
    assert calls == ["up", "down"]
