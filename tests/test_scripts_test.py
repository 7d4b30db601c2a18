"""scripts/test (what .ci/run runs) fails when any stage fails, and says so.

The real script runs in a scratch copy of the repository layout whose tools are test doubles:
`scripts/bootstrap`, `yamllint`, `ansible-lint`, `ruff`, `molecule` and `python -m pytest` are
stubs that exit with the code the test asks for; everything else is the real script.
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
    shutil.copy(ROOT / "scripts" / "test", tmp_path / "scripts" / "test")
    _stub(tmp_path / "scripts" / "bootstrap", "exit 0")
    for d in ("app/tests", "app/edge/tests", "tests"):
        (tmp_path / d).mkdir(parents=True)
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    for tool in ("yamllint", "ansible-lint", "ruff"):
        _stub(venv / tool, 'exit "${FAKE_LINT_RC:-0}"')
    _stub(venv / "molecule", 'echo "molecule $*"; exit "${FAKE_MOLECULE_RC:-0}"')
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
    assert re.search(r"^molecule: \d+ passed, 0 failed$", res.stdout, re.M), res.stdout


@pytest.mark.parametrize("stage", ["lint", "pytest", "molecule"])
def test_one_failing_stage_fails_the_run(fake_repo, stage):
    res = run(fake_repo, **{stage: 1})
    assert res.returncode != 0, f"{stage} failed but scripts/test exited 0:\n{res.stdout}"
    assert "scripts/test: FAILED" in res.stderr
    # the stages after a failing one still run
    assert "==> molecule test -s docker" in res.stdout
