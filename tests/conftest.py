import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
