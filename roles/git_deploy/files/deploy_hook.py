"""Git hooks of the production model repository: validate a pushed release, deploy it, roll back.

Installed by the git_deploy role and run with the serving virtualenv's Python (so the app's own
release checks are used):

    deploy_hook.py pre-receive     refuse a push that would break production (nothing changes)
    deploy_hook.py post-receive    fan the release out to every target, flip `current`, wait
    deploy_hook.py rollback        put the previous release back on every target

Configuration: /etc/modelserve-deploy/deploy.json, rendered from inventory by the role.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from modelserve.release import ReleaseError, validate_release, version_key

CONFIG = Path(os.environ.get("MODELSERVE_DEPLOY_CONFIG", "/etc/modelserve-deploy/deploy.json"))
ZERO = "0" * 40


class Refused(Exception):
    """The push is refused; the message says why."""


def load_config() -> dict:
    return json.loads(CONFIG.read_text())


def say(msg: str) -> None:
    print(f"modelserve: {msg}", flush=True)


def log(conf: dict, msg: str) -> None:
    line = f"{datetime.now(UTC).isoformat(timespec='seconds')} {msg}\n"
    try:
        with open(conf["log"], "a") as fh:
            fh.write(line)
    except OSError as exc:
        say(f"(could not write the deploy log: {exc})")


def export_release(commit: str, path: str, dest: Path) -> Path:
    """Unpack `path` of `commit` into dest; return the release directory."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, path], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise Refused(f"the pushed tree has no '{path}/' directory with a model release")
    tar_path = dest / "release.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(dest / "tree", filter="data")
        else:  # Debian 12's 3.11.2: plain files and directories only, nothing outside the tree
            for member in tar.getmembers():
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise Refused(f"the pushed tree has an unsafe entry: {member.name}")
            tar.extractall(dest / "tree")  # noqa: S202 (members checked above)
    tar_path.unlink()
    return dest / "tree" / path


def served_version(conf: dict) -> str | None:
    try:
        return Path(os.readlink(Path(conf["model_dir"]) / "current")).name
    except OSError:
        return None


def check_release(conf: dict, release: Path) -> dict:
    size = sum(p.stat().st_size for p in release.rglob("*") if p.is_file())
    limit = int(conf["max_release_bytes"])
    if size > limit:
        raise Refused(f"release is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit")
    try:
        meta = validate_release(release)
    except ReleaseError as exc:
        raise Refused(f"invalid model release: {exc}") from None
    version = meta["version"]
    current = served_version(conf)
    if current and version_key(version) <= version_key(current):
        raise Refused(f"version {version} is not higher than the served {current}; bump the version")
    accuracy = float(meta.get("metrics", {}).get("heldout_accuracy", -1))
    if accuracy < float(conf["min_accuracy"]):
        raise Refused(
            f"held-out accuracy {accuracy:.4f} is below the production threshold {conf['min_accuracy']}"
        )
    return meta


# --- talking to the targets ------------------------------------------------------------------


def _cli(conf: dict, *args: str) -> list[str]:
    return ["sudo", "-n", "-u", conf["model_user"], conf["cli"], "--model-dir", conf["model_dir"], *args]


def _ssh(target: dict, *command: str) -> list[str]:
    return [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        f"{target['user']}@{target['address']}",
        " ".join(command),
    ]


def run_on(conf: dict, target: dict, action: str, *args: str) -> str:
    cmd = _cli(conf, action, *args) if target["local"] else _ssh(target, action, *args)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{target['name']}: {action} failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


def ship(conf: dict, target: dict, release: Path, version: str) -> None:
    """Put the release in target's incoming dir, then install it into releases/<version>."""
    incoming = Path(conf["incoming"]) / version
    if target["local"]:
        shutil.rmtree(incoming, ignore_errors=True)
        shutil.copytree(release, incoming)
    else:
        res = subprocess.run(
            [
                "rsync",
                "-a",
                "--delete",
                "-e",
                "ssh -o BatchMode=yes -o ConnectTimeout=10",
                f"{release}/",
                f"{target['user']}@{target['address']}:{incoming}/",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"{target['name']}: copying the release failed: {res.stderr.strip()}")
    run_on(conf, target, "install", str(incoming) if target["local"] else version)


def wait_served(conf: dict, version: str) -> float:
    deadline = time.monotonic() + float(conf["switch_timeout"])
    t0 = time.monotonic()
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(conf["api_url"], timeout=3) as resp:  # noqa: S310 (our own URL)
                last = json.load(resp).get("version")
            if last == version:
                return time.monotonic() - t0
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{conf['api_url']} still reports {last!r}, not {version}")


def deploy(conf: dict, release: Path, meta: dict) -> None:
    version = meta["version"]
    targets = conf["targets"]
    for target in targets:  # every host has the files before any host switches
        ship(conf, target, release, version)
    for target in targets:
        run_on(conf, target, "activate", version)
    took = wait_served(conf, version)
    for target in targets:
        run_on(conf, target, "prune", "--keep", str(conf["keep"]))
    say(f"deployed {version} to {len(targets)} host(s); served after {took:.1f} s")


# --- hooks -----------------------------------------------------------------------------------


def pre_receive(conf: dict, lines: list[str]) -> int:
    deploy_ref = f"refs/heads/{conf['branch']}"
    for line in lines:
        _old, new, ref = line.split()
        if ref != deploy_ref:
            continue
        if new == ZERO:
            say(f"REJECTED: {deploy_ref} is what production serves; it cannot be deleted")
            return 1
        with tempfile.TemporaryDirectory() as tmp:
            try:
                meta = check_release(conf, export_release(new, conf["release_path"], Path(tmp)))
            except Refused as exc:
                say(f"REJECTED: {exc}")
                say("production keeps serving " + (served_version(conf) or "its current model"))
                return 1
        say(
            f"release {meta['version']} accepted (held-out accuracy "
            f"{meta['metrics']['heldout_accuracy']}), deploying after the push"
        )
    return 0


def post_receive(conf: dict, lines: list[str]) -> int:
    deploy_ref = f"refs/heads/{conf['branch']}"
    for line in lines:
        _old, new, ref = line.split()
        if ref != deploy_ref:
            say(f"{ref} stored, not deployed (production follows {deploy_ref})")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            release = export_release(new, conf["release_path"], Path(tmp))
            meta = validate_release(release)
            try:
                deploy(conf, release, meta)
            except RuntimeError as exc:
                log(conf, f"FAILED {meta['version']} {new[:12]}: {exc}")
                say(f"DEPLOY FAILED: {exc}")
                say("run `modelserve-rollback` on this host (or playbooks/rollback.yml) to restore")
                return 1
            log(conf, f"deployed {meta['version']} {new[:12]}")
    return 0


def rollback(conf: dict) -> int:
    current = served_version(conf)
    try:
        for target in conf["targets"]:
            run_on(conf, target, "rollback")
        version = served_version(conf)
        took = wait_served(conf, version)
    except RuntimeError as exc:
        say(f"ROLLBACK FAILED: {exc}")
        return 1
    log(conf, f"rolled back {current} -> {version}")
    say(f"rolled back from {current} to {version}; served after {took:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("pre-receive", "post-receive", "rollback"):
        print("usage: deploy_hook.py pre-receive|post-receive|rollback", file=sys.stderr)
        return 2
    conf = load_config()
    if argv[0] == "rollback":
        return rollback(conf)
    lines = [ln for ln in sys.stdin.read().splitlines() if ln.strip()]
    return pre_receive(conf, lines) if argv[0] == "pre-receive" else post_receive(conf, lines)


if __name__ == "__main__":
    sys.exit(main())
