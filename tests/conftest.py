import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every environment's inventory (inventories/<env>), and those whose machines are on OpenStack.
INVENTORIES = sorted(p.parent.name for p in (ROOT / "inventories").glob("*/hosts.yml"))
OPENSTACK_INVENTORIES = [
    env for env in INVENTORIES if (ROOT / "inventories" / env / "openstack.yml").exists()
]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def ansible_bin() -> Path:
    """Directory holding ansible-* commands (the project venv when run from scripts/test)."""
    for candidate in (ROOT / ".venv" / "bin", Path(shutil.which("ansible-playbook") or "").parent):
        if (candidate / "ansible-playbook").exists():
            return candidate
    pytest.skip("ansible-playbook not installed")


@pytest.fixture(scope="session")
def ansible_env() -> dict:
    env = dict(os.environ)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(ROOT / ".cache" / "collections")
    env["ANSIBLE_NOCOLOR"] = "1"
    return env


def run_playbook(play: str, tmp_path: Path, ansible_bin, ansible_env, *args, inventory=None, env=None):
    """Write `play` to tmp_path and run it from the repository root; `inventory` names inventories/<env>."""
    path = tmp_path / "play.yml"
    path.write_text(play)
    cmd = [ansible_bin / "ansible-playbook", path]
    if inventory:
        cmd += ["-i", ROOT / "inventories" / inventory]
    cmd += list(args)
    return subprocess.run(cmd, cwd=ROOT, env=dict(ansible_env, **(env or {})), capture_output=True, text=True)
