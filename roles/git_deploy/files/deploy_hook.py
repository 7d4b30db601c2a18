"""Git hooks of the production model repository: validate a pushed release, deploy it, roll back.

Installed by the git_deploy role and run with the serving virtualenv's Python (so the app's own
release checks are used):

    deploy_hook.py pre-receive        validate, then deploy to every target, all or nothing; a refused
                                      or failed deploy refuses the push (the branch does not move)
    deploy_hook.py post-receive       announce refs that are stored but not deployed
    deploy_hook.py rollback [X.Y.Z]   serve X.Y.Z (default: the release served before) everywhere
    deploy_hook.py sync               serve the desired release on every target (site.yml)
    deploy_hook.py canary promote|abort|status
                                      end a canary (`git push -o canary=N`): serve it everywhere, or
                                      put its hosts back on the stable release; or say what runs
    deploy_hook.py attest [X.Y.Z]     attest the release this stage serves (its bytes and record) into
                                      `state_dir`/outbox for a later stage (playbooks/promote.yml)
    deploy_hook.py promote ATTESTATION ARCHIVE
                                      serve what an earlier stage attested: its exact bytes (digest),
                                      served there long enough, then this stage's own gate; all or
                                      nothing like a push. With `promote_from` set, pushes are refused.

A canary release is installed on every target but activated on ceil(N% of the targets) only (at
least one, never all); the state records it beside the stable desired release until it ends.

Production's one record of what it serves is the state file (`state_dir`/state.json: the desired
release and the ones served before, newest first), next to a store of those releases that workers
joining later are served from. Every change takes `state_dir`/lock, so changes run one at a time.

Configuration: /etc/modelserve-deploy/deploy.json, rendered from inventory by the role.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import getpass
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from modelserve.release import (
    SEMVER,
    ReleaseError,
    read_metadata,
    release_digest,
    validate_release,
    version_key,
)

CONFIG = Path(os.environ.get("MODELSERVE_DEPLOY_CONFIG", "/etc/modelserve-deploy/deploy.json"))
ZERO = "0" * 40


class Refused(Exception):
    """The change is refused before anything was changed; the message says why."""


class HostFailed(Exception):
    """A step failed on one target (named first in the message)."""

    def __init__(self, host: str, why: str):
        super().__init__(f"{host}: {why}")
        self.host = host


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
    unpack(tar_path, dest / "tree", "the pushed tree")
    tar_path.unlink()
    return dest / "tree" / path


def unpack(tar_path: Path, dest: Path, what: str) -> None:
    """Extract a tar archive: plain files and directories only, nothing outside `dest`."""
    try:
        with tarfile.open(tar_path) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                tar.extractall(dest, filter="data")
                return
            for member in tar.getmembers():  # Debian 12's 3.11.2 has no filters
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise Refused(f"{what} has an unsafe entry: {member.name}")
            tar.extractall(dest)  # noqa: S202 (members checked above)
    except (tarfile.TarError, OSError) as exc:
        raise Refused(f"{what} cannot be unpacked: {exc}") from None


def served_version(conf: dict) -> str | None:
    try:
        return Path(os.readlink(Path(conf["model_dir"]) / "current")).name
    except OSError:
        return None


def check_release(conf: dict, release: Path) -> dict:
    """Size, structure, checksums and a higher version; loading and metrics come later (gate)."""
    size = sum(p.stat().st_size for p in release.rglob("*") if p.is_file())
    limit = int(conf["max_release_bytes"])
    if size > limit:
        raise Refused(f"release is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit")
    try:
        # Structure and checksums only: the pushed model is first loaded inside the gate's sandbox,
        # never by the hook, which runs with the deploy account's keys.
        meta = validate_release(release, load=False)
    except ReleaseError as exc:
        raise Refused(f"invalid model release: {exc}") from None
    version = meta["version"]
    current = desired_version(conf)
    if current and version_key(version) <= version_key(current):
        raise Refused(f"version {version} is not higher than the served {current}; bump the version")
    return meta


# --- the gate: production measures the release on its own data ----------------------------------


def measure(conf: dict, candidate: Path, served: Path) -> dict:
    """Accuracy and AUC of both releases on production's evaluation data, from the sandboxed gate."""
    cmd = [*conf["gate_command"], "--against", str(served), str(candidate)]
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=float(conf["gate_timeout"]) + 30
        )
    except subprocess.TimeoutExpired:
        raise Refused(f"the release gate took longer than {conf['gate_timeout']} s") from None
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "XNNPACK" not in ln]
        why = lines[-1] if lines else f"exit status {res.returncode} (time or memory limit?)"
        raise Refused(f"the release gate could not measure the release: {why}")
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise Refused(f"the release gate answered {res.stdout.strip()[:200]!r}, not its figures") from None


def judge(conf: dict, measured: dict, served_version: str) -> list[str]:
    """Why the measured candidate may not replace the served release (empty: it may)."""
    new, old = measured["candidate"], measured["served"]
    problems = []
    for name, key in (("accuracy", "accuracy"), ("AUC", "auc")):
        floor, max_drop = float(conf[f"min_{key}"]), float(conf[f"max_{key}_drop"])
        if new[key] < floor:
            problems.append(f"{name} {new[key]:.4f} is below the floor {floor}")
        if old and old[key] - new[key] > max_drop:
            problems.append(
                f"{name} {new[key]:.4f} is {old[key] - new[key]:.4f} below the served {served_version}'s "
                f"{old[key]:.4f} (at most {max_drop} allowed)"
            )
    return problems


def gate(conf: dict, release: Path, meta: dict) -> dict:
    """Refuse a release that production's own measurement finds wanting; return the figures."""
    state = adopted_state(conf)
    served_version = state["desired"]
    measured = measure(conf, release, ensure_stored(conf, served_version))
    rows = measured["candidate"]["rows"]
    problems = judge(conf, measured, served_version)
    if problems:
        claimed = meta.get("metrics", {})
        raise Refused(
            f"release {meta['version']} measured on production's {rows} evaluation rows: "
            + "; ".join(problems)
            + f" (its metadata claims accuracy {claimed.get('heldout_accuracy')} and AUC "
            f"{claimed.get('heldout_auc')}; the gate ignores claims)"
        )
    return measured["candidate"]


# --- the desired release: one record on the repository host ----------------------------------

HISTORY_MAX = 50  # entries of the state's history kept (the store keeps fewer releases: `keep`)


def state_file(conf: dict) -> Path:
    return Path(conf["state_dir"]) / "state.json"


def store(conf: dict) -> Path:
    return Path(conf["state_dir"]) / "releases"


def read_state(conf: dict) -> dict | None:
    try:
        return json.loads(state_file(conf).read_text())
    except FileNotFoundError:
        return None


def desired_version(conf: dict) -> str | None:
    """What production serves: the state's record, or (never changed yet) this host's release."""
    state = read_state(conf)
    return state["desired"] if state else served_version(conf)


def write_state(
    conf: dict, version: str, action: str, commit: str | None = None, record: dict | None = None
) -> dict:
    """Record `version` as the desired release; `record` is what is known of it (its gate figures
    here, the stage it was promoted from), kept per release while the history names it."""
    old = read_state(conf) or {"history": []}
    history = [version, *old["history"][: HISTORY_MAX - 1]]
    if len(history) > 1 and history[1] == version:
        history.pop(1)
    state = {
        "desired": version,
        "commit": commit or (old.get("commit") if action != "rollback" else None),
        "action": action,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "history": history,
    }
    records = {v: r for v, r in old.get("records", {}).items() if v in history}
    if record:
        records[version] = record
    state["records"] = records
    return save_state(conf, state)  # a new desired release ends any canary (promote)


def save_state(conf: dict, state: dict) -> dict:
    # Readers see the old or the new record, never half of one.
    tmp = state_file(conf).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_file(conf))
    return state


def adopted_state(conf: dict) -> dict:
    """The state, recorded first from this host's served release (and stored) if there is none:
    the seed on a cluster that never had a release, or what it served before this record existed."""
    state = read_state(conf)
    if state is None:
        version = served_version(conf)
        if not version:
            raise Refused(f"no release recorded and none served in {conf['model_dir']}")
        ensure_stored(conf, version)
        state = write_state(conf, version, "adopt")
        say(f"recorded {version}, served on this host, as the desired release")
    return state


def previous_version(state: dict) -> str | None:
    return next((v for v in state["history"] if v != state["desired"]), None)


def ensure_stored(conf: dict, version: str, source: Path | None = None) -> Path:
    """The store's copy of `version` (made from `source`, or this host's own release directory)."""
    dest = store(conf) / version
    if dest.is_dir():
        if source is not None and read_metadata(dest) != read_metadata(source):
            raise Refused(f"release {version} was pushed before with other contents; bump the version")
        return dest
    source = source or Path(conf["model_dir"]) / "releases" / version
    if not (source / "metadata.json").is_file():
        have = ", ".join(sorted((p.name for p in store(conf).glob("*") if p.is_dir()), key=version_key))
        raise Refused(f"release {version} is not in the release store (it has: {have or 'nothing'})")
    store(conf).mkdir(parents=True, exist_ok=True)
    tmp = store(conf) / f".{version}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=shutil.copyfile)  # workers' copies are read-only
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    return dest


def prune_store(conf: dict, state: dict) -> None:
    wanted = list(dict.fromkeys(state["history"]))[: int(conf["keep"])]
    if state.get("canary"):  # not in the history until promoted
        wanted.append(state["canary"]["version"])
    for path in store(conf).iterdir():
        if path.is_dir() and path.name not in wanted:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(conf: dict):
    """A fresh directory to unpack a push into, removed afterwards. Under the change lock nothing
    else stages, so what an interrupted push left behind is removed first."""
    root = Path(conf["staging"])
    root.mkdir(mode=0o750, exist_ok=True)
    for old in root.iterdir():
        shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        yield Path(tmp)


# --- one change at a time --------------------------------------------------------------------

# Keeps the lock of a successful push until git has moved the branch and receive-pack has exited,
# so a push that waited sees the branch that production now serves (bounded by argv[2] seconds).
_HOLDER = """import os, sys, time
pid, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    time.sleep(0.1)
"""


@contextlib.contextmanager
def change_lock(conf: dict, what: str):
    """Hold the repository host's change lock, waiting at most `lock_timeout` seconds for it."""
    state_dir = Path(conf["state_dir"])
    info = state_dir / "lock.info"
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        deadline = time.monotonic() + float(conf["lock_timeout"])
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = info.read_text().strip() if info.exists() else "another change"
                if time.monotonic() >= deadline:
                    raise Refused(
                        f"{holder} still holds the change lock after {conf['lock_timeout']} s; "
                        "nothing was changed, try again when it is done"
                    ) from None
                if not waited:
                    say(f"waiting up to {conf['lock_timeout']} s for {holder} to finish")
                    waited = True
                time.sleep(0.2)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        info.write_text(f"the {what} (pid {os.getpid()}, since {stamp})\n")
        yield fd
    finally:
        os.close(fd)


def hold_until_push_ends(conf: dict, fd: int) -> None:
    subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(os.getppid()), str(conf["lock_timeout"])],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # git waits for the hook's output to close: not for this one
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# --- talking to the targets ------------------------------------------------------------------

COMMAND_TIMEOUT = 120  # seconds for one step on one target (copy, install, activate, check)
MAX_PARALLEL = 16  # targets a step runs on at once
# One SSH connection per target for one change (its steps reuse it rather than a new handshake),
# never shared with the next change: that one must find out for itself whether a target answers.
SSH_OPTIONS = [
    "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ControlMaster=auto",
    "-o", f"ControlPath=~/.ssh/cm-{os.getpid()}-%C", "-o", "ControlPersist=30",
]  # fmt: skip


def _cli(conf: dict, *args: str) -> list[str]:
    cli = [conf["cli"], "--model-dir", conf["model_dir"], *args]
    if conf["model_user"] == getpass.getuser():
        return cli
    return ["sudo", "-n", "-u", conf["model_user"], *cli]


def _ssh(target: dict, *command: str) -> list[str]:
    return ["ssh", *SSH_OPTIONS, f"{target['user']}@{target['address']}", " ".join(command)]


def run_on(conf: dict, target: dict, action: str, *args: str) -> str:
    if target.get("model_dir"):  # a local target with directories of its own (tests)
        conf = {**conf, "model_dir": target["model_dir"], "incoming": target["incoming"]}
    if not target["local"]:
        cmd = _ssh(target, action, *args)
    elif action == "install":  # the local copy is in the incoming directory
        cmd = _cli(conf, "install", str(Path(conf["incoming"]) / args[0]))
    elif action == "verify":
        cmd = _cli(conf, "validate", str(Path(conf["model_dir"]) / "current"))
    else:
        cmd = _cli(conf, action, *args)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise HostFailed(target["name"], f"{action} took longer than {COMMAND_TIMEOUT} s") from None
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines() or [f"exit status {res.returncode}"]
        raise HostFailed(target["name"], f"{action} failed: {lines[-1]}")
    return res.stdout.strip()


def close_connections(conf: dict) -> None:
    """End this change's SSH connections (they would otherwise linger ControlPersist seconds)."""
    for target in conf.get("targets", []):
        if not target["local"]:
            subprocess.run(
                ["ssh", *SSH_OPTIONS, "-O", "exit", f"{target['user']}@{target['address']}"],
                capture_output=True,
                check=False,
                timeout=10,
            )


def ship(conf: dict, target: dict, release: Path, version: str) -> None:
    """Put the release in target's incoming dir, then install it into releases/<version>."""
    incoming = Path(target.get("incoming") or conf["incoming"]) / version
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
                " ".join(["ssh", *SSH_OPTIONS]),
                f"{release}/",
                f"{target['user']}@{target['address']}:{version}/",  # rrsync: relative to incoming
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT,
        )
        if res.returncode != 0:
            raise HostFailed(target["name"], f"copying the release failed: {res.stderr.strip()}")
    try:
        run_on(conf, target, "install", version)  # on a remote target, install removes the copy
    finally:
        if target["local"]:
            shutil.rmtree(incoming, ignore_errors=True)


def on_each(targets: list[dict], step) -> list[tuple[dict, object]]:
    """Run step(target) on every target at once (each is its own SSH session); return, in target
    order, each target with its result or the HostFailed it raised."""
    if not targets:
        return []

    def attempt(target):
        try:
            return step(target)
        except HostFailed as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(targets), MAX_PARALLEL)) as pool:
        return list(zip(targets, pool.map(attempt, targets), strict=True))


def first_failure(results: list[tuple[dict, object]]) -> None:
    for _target, result in results:
        if isinstance(result, HostFailed):
            raise result


def precheck(conf: dict) -> dict[str, str]:
    """Every target answers with the release it serves, or the change is refused untouched."""
    results = on_each(conf["targets"], lambda t: run_on(conf, t, "current"))
    try:
        first_failure(results)
    except HostFailed as exc:
        raise Refused(f"{exc} (unreachable or not serving); nothing was changed") from None
    return {target["name"]: result for target, result in results}


def confirm(conf: dict, target: dict, version: str) -> None:
    """The target itself says it serves `version` and loads it (its own LiteRT, its own files)."""
    now = run_on(conf, target, "current")
    if now != version:
        raise HostFailed(target["name"], f"serves {now}, not {version}")
    run_on(conf, target, "verify")


def switch(conf: dict, target: dict, version: str) -> None:
    """Activate `version` on the target, which loads it before the flip and reads its `current`
    back after it: the target's own confirmation, in one step."""
    said = run_on(conf, target, "activate", version).splitlines()
    now = said[-1].removeprefix("serving ") if said else "nothing"
    if now != version:
        raise HostFailed(target["name"], f"serves {now} after activating {version}")


def wait_served(conf: dict, version: str) -> None:
    """The front end answers with the version too (every worker confirmed it already)."""
    deadline = time.monotonic() + float(conf["switch_timeout"])
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(conf["api_url"], timeout=3) as resp:  # noqa: S310 (our own URL)
                last = json.load(resp).get("version")
            if last == version:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise HostFailed("the front end", f"{conf['api_url']} still reports {last!r}, not {version}")


def change_fleet(
    conf: dict, version: str, release: Path, served: dict[str, str], hosts: list[str] | None = None
) -> list[str]:
    """Serve `version` on every target (or on `hosts` only: a canary's), or on none: install, then
    activate, each target confirming; on any failure every activated target goes back to what it
    served. Each step runs on all targets at once, so a deploy takes about as long for 3 workers
    as for 1."""
    targets = [t for t in conf["targets"] if hosts is None or t["name"] in hosts]
    moving = [t for t in targets if served[t["name"]] != version]
    # Every host has the files before any host switches.
    first_failure(on_each(moving, lambda t: ship(conf, t, release, version)))
    activated = []
    try:
        results = on_each(moving, lambda t: switch(conf, t, version))
        # A failed activate leaves that target's `current` as it was; a failed read-back may not.
        activated = [t for t, r in results if not (isinstance(r, HostFailed) and "activate failed" in str(r))]
        first_failure(results)
        staying = [t for t in targets if t not in moving]  # already on it: confirm them too
        first_failure(on_each(staying, lambda t: confirm(conf, t, version)))
        # The front end answers from any worker: it names one version only when all serve it.
        if conf.get("api_url") and moving and hosts is None:
            wait_served(conf, version)
    except HostFailed as exc:
        put_back(conf, activated, served, exc)
        raise
    return [t["name"] for t in moving]


def put_back(conf: dict, targets: list[dict], served: dict[str, str], exc: HostFailed) -> None:
    """Every target in `targets` back on what it served (all at once); name any that would not go."""
    for _target, back in on_each(targets, lambda t: run_on(conf, t, "activate", served[t["name"]])):
        if isinstance(back, HostFailed):
            exc.args = (f"{exc}; and restoring failed on {back}",)


def change_plan(
    conf: dict, plan: list[tuple[str, list[str] | None]], served: dict[str, str]
) -> dict[str, str]:
    """change_fleet for each (version, hosts) of `plan` in turn, all or nothing across them (a sync
    during a canary: the stable release on some hosts, the canary on the others); what moved."""
    moved: dict[str, str] = {}
    try:
        for version, hosts in plan:
            moved |= dict.fromkeys(
                change_fleet(conf, version, ensure_stored(conf, version), served, hosts), version
            )
    except HostFailed as exc:
        put_back(conf, [t for t in conf["targets"] if t["name"] in moved], served, exc)
        raise
    return moved


def tidy(conf: dict, state: dict) -> None:
    """Targets and store down to `keep` releases (the canary's kept while it runs)."""
    prune_targets(conf)
    prune_store(conf, state)


def prune_targets(conf: dict) -> None:
    results = on_each(conf["targets"], lambda t: run_on(conf, t, "prune", "--keep", str(conf["keep"])))
    for _target, result in results:
        if isinstance(result, HostFailed):  # the deploy stands; the next one prunes again
            say(f"(pruning: {result})")


def restored(conf: dict, served: dict[str, str]) -> str:
    versions = sorted(set(served.values()))
    return f"every target is back on {', '.join(versions) or 'what it served'}"


# --- hooks -----------------------------------------------------------------------------------


def _ref(name: str) -> str:
    res = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", name], capture_output=True, text=True, check=False
    )
    return res.stdout.strip() or ZERO


def deploy(
    conf: dict,
    release: Path,
    meta: dict,
    commit: str,
    canary: list[str] | None = None,
    record: dict | None = None,
    served: dict[str, str] | None = None,
) -> None:
    """Serve the release everywhere, or (a canary) install it everywhere and serve it on `canary`.
    `served`: what each target answered it serves, if the caller asked them already (precheck)."""
    version = meta["version"]
    served = served or precheck(conf)
    state = adopted_state(conf)  # the release served before is recorded (and stored) to roll back to
    stored = ensure_stored(conf, version, release)
    t0 = time.monotonic()
    try:
        if canary:  # installed on the other targets too, so a promotion is activations only
            others = [t for t in conf["targets"] if t["name"] not in canary]
            first_failure(on_each(others, lambda t: ship(conf, t, stored, version)))
        change_fleet(conf, version, stored, served, canary)
    except HostFailed as exc:
        log(conf, f"FAILED {version} {commit[:12]}: {exc}")
        what = "canary" if canary else "deploy"
        raise Refused(f"{what} of {version} FAILED on {exc}; {restored(conf, served)}") from None
    took = time.monotonic() - t0
    if canary:
        start_canary(conf, state, meta, commit, canary, took, record)
        return
    state = write_state(conf, version, "deploy", commit, record)
    tidy(conf, state)
    log(conf, f"deployed {version} {commit[:12]}")
    say(
        f"deployed {version} to {len(conf['targets'])} host(s); each confirmed it serves it "
        f"after {took:.1f} s"
    )


# --- canary releases -------------------------------------------------------------------------


def push_options() -> dict[str, str]:
    """`git push -o key=value` options (the repository advertises them: receive.advertisePushOptions)."""
    count = int(os.environ.get("GIT_PUSH_OPTION_COUNT") or 0)
    pairs = (os.environ.get(f"GIT_PUSH_OPTION_{i}", "").partition("=") for i in range(count))
    return {key: value for key, _, value in pairs}


def canary_hosts(conf: dict, options: dict[str, str]) -> list[str] | None:
    """The targets a `-o canary=N` push serves on: ceil(N% of them), at least one, never all."""
    unknown = sorted(set(options) - {"canary"})
    if unknown:
        raise Refused(f"unknown push option {', '.join(unknown)} (production knows canary=N)")
    if "canary" not in options:
        return None
    value = options["canary"]
    if not value.isdigit() or not 1 <= int(value) <= 99:
        raise Refused(f"canary={value}: give the share of workers in percent, 1 to 99")
    names = [t["name"] for t in conf["targets"]]
    count = (len(names) * int(value) + 99) // 100
    if count >= len(names):
        most = 100 * (len(names) - 1) // len(names)
        hint = f"at most canary={most}" if most else "a canary needs at least 2 workers"
        raise Refused(f"canary={value} of {len(names)} worker(s) is all of them; {hint}")
    return names[-count:]  # the repository host (first) stays on the stable release


def end_commands(conf: dict) -> str:
    repo = next((t["name"] for t in conf["targets"] if t["local"]), "the repository host")
    return (
        f"`modelserve-canary promote` or `abort` on {repo}, "
        "or `ansible-playbook playbooks/canary.yml -e action=promote|abort`"
    )


def describe_canary(state: dict) -> str:
    c = state["canary"]
    return (
        f"canary {c['version']} ({c['percent']}%) runs on {', '.join(c['hosts'])} since {c['since']}, "
        f"the others serve the stable {state['desired']}"
    )


def refuse_during_canary(conf: dict, what: str, first: str = "end it first") -> None:
    state = read_state(conf)
    if state and state.get("canary"):
        raise Refused(f"{what} while {describe_canary(state)}; {first}: {end_commands(conf)}")


def start_canary(
    conf: dict, state: dict, meta: dict, commit: str, hosts: list[str], took: float, record: dict | None
) -> None:
    version = meta["version"]
    state["canary"] = {
        "version": version,
        "hosts": hosts,
        "percent": int(push_options()["canary"]),
        "commit": commit,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "record": record,
    }
    save_state(conf, state)
    log(conf, f"canary {version} {commit[:12]} on {', '.join(hosts)}")
    say(
        f"canary {version} installed on {len(conf['targets'])} host(s), served by {', '.join(hosts)} "
        f"(each confirmed it after {took:.1f} s); the others keep serving {state['desired']}"
    )
    say(f"end it with {end_commands(conf)}")


def end_canary(conf: dict, action: str) -> tuple[str, str]:
    """promote: serve the canary on every target and record it; abort: its hosts back to stable."""
    with change_lock(conf, f"canary {action}"):
        state = adopted_state(conf)
        canary = state.get("canary")
        if not canary:
            raise Refused(f"no canary is running; production serves {state['desired']}")
        served = precheck(conf)
        stable = state["desired"]
        version, hosts = (canary["version"], None) if action == "promote" else (stable, canary["hosts"])
        try:
            change_fleet(conf, version, ensure_stored(conf, version), served, hosts)
        except HostFailed as exc:
            raise Refused(f"{action} FAILED on {exc}; {restored(conf, served)}") from None
        if action == "promote":
            state = write_state(conf, version, "promote", canary["commit"], canary.get("record"))
        else:
            del state["canary"]
            save_state(conf, state)
        tidy(conf, state)
    if action == "promote":
        return (
            f"promoted canary {version} (stable was {stable})",
            f"promoted {version}: every one of {len(conf['targets'])} host(s) confirmed it serves it",
        )
    return (
        f"aborted canary {canary['version']}, {', '.join(hosts)} back on {stable}",
        f"aborted canary {canary['version']}: {', '.join(hosts)} serve {stable} again, like the others",
    )


def canary_status(conf: dict) -> int:
    state = read_state(conf)
    if not state or not state.get("canary"):
        say(f"no canary is running; production serves {desired_version(conf)}")
        return 0
    say(describe_canary(state))
    for target, result in on_each(conf["targets"], lambda t: run_on(conf, t, "current")):
        say(f"  {result}" if isinstance(result, HostFailed) else f"  {target['name']} serves {result}")
    say(f"end it with {end_commands(conf)}")
    return 0


# --- staged promotion: dev -> svt -> prod ------------------------------------------------------

ATTESTATION_MAX_AGE = 900  # seconds: a promotion acts on what the earlier stage served just now


def refuse_unpromoted(conf: dict) -> None:
    """An environment with an earlier stage takes no pushes: only what that stage served."""
    earlier = conf.get("promote_from")
    if earlier:
        env = conf["environment"]
        raise Refused(
            f"{env} takes releases only promoted from {earlier} (the same bytes {earlier} served and "
            f"verified): push to {earlier}, and once it has served the release for "
            f"{conf['promote_soak']} s run `ansible-playbook playbooks/promote.yml -i inventories/{env} "
            f"-e from={earlier}`"
        )


def attest(conf: dict, version: str | None) -> tuple[None, str]:
    """Write an attestation of the release this environment serves (and its bytes) to the outbox:
    what a later stage's `promote` checks. Refused unless every target serves it after its gate."""
    env = conf["environment"]
    outbox = Path(conf["state_dir"]) / "outbox"
    with change_lock(conf, "attestation for a promotion"):  # no change runs meanwhile
        shutil.rmtree(outbox, ignore_errors=True)
        state = read_state(conf)
        if not state:
            raise Refused(f"stage {env} has no release record: nothing was ever deployed there")
        desired = state["desired"]
        version = version or desired
        canary = state.get("canary") or {}
        if canary.get("version") == version:
            raise Refused(f"stage {env} serves {version} only as a canary; promote the canary there first")
        if version != desired:
            before = " (it did before)" if version in state["history"] else ""
            raise Refused(f"stage {env} does not serve {version}{before}; it serves {desired}")
        record = state.get("records", {}).get(version) or {}
        if "gate" not in record:
            raise Refused(f"stage {env} serves {version} without having gated it ({state['action']})")
        served = precheck(conf)
        others = sorted(f"{name} serves {v}" for name, v in served.items() if v != version)
        if others:
            raise Refused(f"not every worker of stage {env} serves {version}: {'; '.join(others)}")
        try:
            if conf.get("api_url"):
                wait_served(conf, version)  # and its front end answers with it
        except HostFailed as exc:
            raise Refused(f"stage {env} does not answer with {version}: {exc}") from None
        stored = store(conf) / version
        now = datetime.now(UTC)
        attestation = {
            "environment": env,
            "version": version,
            "commit": state.get("commit"),
            "digest": release_digest(stored),
            "gate": record["gate"],
            "promoted_from": record.get("promoted_from"),
            "served_since": state["at"],
            "served_seconds": int((now - datetime.fromisoformat(state["at"])).total_seconds()),
            "workers": sorted(served),
            "attested_at": now.isoformat(timespec="seconds"),
        }
        outbox.mkdir(mode=0o700)
        with tarfile.open(outbox / "release.tar", "w") as tar:
            tar.add(stored, arcname="release")
        (outbox / "attestation.json").write_text(json.dumps(attestation, indent=2) + "\n")
    say(f"outbox: {outbox}")
    return None, (
        f"stage {env} attests {version} ({attestation['digest'][:19]}...): served by "
        f"{len(served)} worker(s) for {attestation['served_seconds']} s since its gate passed"
    )


def check_attestation(conf: dict, a: dict) -> None:
    """Refuse an attestation from the wrong stage, too fresh a release or too old a statement."""
    env, earlier = conf["environment"], conf.get("promote_from")
    source, version = a.get("environment"), a.get("version")
    if earlier and source != earlier:
        raise Refused(f"{env} takes releases only from stage {earlier}; this one comes from {source}")
    age = (datetime.now(UTC) - datetime.fromisoformat(a["attested_at"])).total_seconds()
    if age > ATTESTATION_MAX_AGE:
        raise Refused(f"the attestation of {source} is {age:.0f} s old; attest again")
    soak = int(conf["promote_soak"])
    if int(a["served_seconds"]) < soak:
        raise Refused(
            f"stage {source} has served {version} for {a['served_seconds']} s; {env} takes a "
            f"release after {soak} s there (in about {soak - int(a['served_seconds'])} s)"
        )


def promote(conf: dict, attestation: Path, archive: Path) -> tuple[str | None, str]:
    """Serve a release an earlier stage attested, as exactly the bytes it served, after this
    environment's own gate; all or nothing like a push."""
    env = conf["environment"]
    try:
        a = json.loads(attestation.read_text())
        source, version = a["environment"], a["version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Refused(f"the attestation is unreadable: {exc}") from None
    check_attestation(conf, a)
    with change_lock(conf, f"promotion of {version} from {source}"):
        state = adopted_state(conf)
        if state["desired"] == version and release_digest(store(conf) / version) == a["digest"]:
            return None, f"{env} already serves {version}, the bytes {source} served"
        refuse_during_canary(conf, "a promotion")
        with staging_dir(conf) as tmp:
            unpack(archive, tmp / "tree", f"the release {source} sent")
            release = tmp / "tree" / "release"
            digest = release_digest(release) if release.is_dir() else "nothing"
            if digest != a["digest"]:
                raise Refused(
                    f"the release received is not the bytes stage {source} served: digest {digest}, "
                    f"attested {a['digest']}"
                )
            meta = check_release(conf, release)
            if meta["version"] != version:
                raise Refused(f"the release received is {meta['version']}, the attestation names {version}")
            m = gate(conf, release, meta)
            say(
                f"release {version} from {source} ({digest[:19]}...) passed {env}'s gate (accuracy "
                f"{m['accuracy']:.4f}, AUC {m['auc']:.4f} on {m['rows']} rows), deploying"
            )
            promoted_from = {k: a[k] for k in ("environment", "served_since", "served_seconds", "gate")}
            record = {"gate": m, "digest": digest, "promoted_from": promoted_from}
            deploy(conf, release, meta, a.get("commit") or ZERO, record=record)
    return f"promoted {version} from {source} ({digest})", f"{env} serves {version}, promoted from {source}"


def pre_receive(conf: dict, lines: list[str]) -> int:
    deploy_ref = f"refs/heads/{conf['branch']}"
    updates = [line.split() for line in lines if line.split()[2] == deploy_ref]
    if not updates:
        return 0
    old, new, _ = updates[0]
    if new == ZERO:
        say(f"REJECTED: {deploy_ref} is what production serves; it cannot be deleted")
        return 1
    try:
        with change_lock(conf, f"push of {new[:12]}") as lock:
            now = _ref(deploy_ref)
            if now != old:
                raise Refused(
                    f"{deploy_ref} moved to {now[:12]} while this push waited (production serves "
                    f"{desired_version(conf)}); fetch, rebase on it and push again"
                )
            refuse_unpromoted(conf)
            canary = canary_hosts(conf, push_options())
            refuse_during_canary(conf, "a canary push" if canary else "a push to " + conf["branch"])
            with staging_dir(conf) as tmp:
                release = export_release(new, conf["release_path"], tmp)
                meta = check_release(conf, release)
                t0 = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                    # Every target answers (its SSH connection then stays up) while the gate measures.
                    reach = pool.submit(precheck, conf)
                    m = gate(conf, release, meta)
                    served = reach.result()
                to = f"a canary on {', '.join(canary)}" if canary else f"{len(conf['targets'])} host(s)"
                say(
                    f"release {meta['version']} passed the gate (measured on {m['rows']} rows: accuracy "
                    f"{m['accuracy']:.4f}, AUC {m['auc']:.4f}; {time.monotonic() - t0:.1f} s), "
                    f"deploying to {to}"
                )
                deploy(conf, release, meta, new, canary, {"gate": m}, served)
            hold_until_push_ends(conf, lock)
    except Refused as exc:
        say(f"REJECTED: {exc}")
        say("production keeps serving " + (desired_version(conf) or "its current model"))
        return 1
    return 0


def post_receive(conf: dict, lines: list[str]) -> int:
    deploy_ref = f"refs/heads/{conf['branch']}"
    for line in lines:
        _old, _new, ref = line.split()
        if ref != deploy_ref:
            say(f"{ref} stored, not deployed (production follows {deploy_ref})")
    return 0


def sync_plan(state: dict, served: dict[str, str]) -> list[tuple[str, list[str] | None]]:
    """The desired release everywhere; during a canary its hosts keep it and every other target (a
    new one too) gets the stable release. Never a target back past what production recorded."""
    version = state["desired"]
    canary = state.get("canary") or {"version": None, "hosts": []}
    ahead = [
        f"{name} serves {v}"
        for name, v in served.items()
        if v not in (*state["history"], canary["version"]) and version_key(v) > version_key(version)
    ]
    if ahead:
        raise Refused(f"{'; '.join(ahead)}, newer than the desired {version} and never recorded")
    if not canary["hosts"]:
        return [(version, None)]
    return [(version, [n for n in served if n not in canary["hosts"]]), (canary["version"], canary["hosts"])]


def serve_desired(conf: dict, action: str, version: str | None = None) -> tuple[str | None, str]:
    """Rollback (to `version`, default the one served before) or sync (to the desired release)."""
    what = f"rollback to {version or 'the release served before'}"
    with change_lock(conf, what if action == "rollback" else "site.yml release sync"):
        state = adopted_state(conf)
        current = state["desired"]
        if action == "rollback":
            refuse_during_canary(conf, "a rollback", "abort it first")
            version = version or previous_version(state)
            if not version:
                raise Refused(f"no release before {current} is recorded")
        version = version or current
        served = precheck(conf)
        plan = sync_plan(state, served) if action == "sync" else [(version, None)]
        try:
            moved = change_plan(conf, plan, served)
        except HostFailed as exc:
            raise Refused(f"{action} to {version} FAILED on {exc}; {restored(conf, served)}") from None
        if action == "rollback":
            state = write_state(conf, version, action)
        tidy(conf, state)  # git_deploy_releases_keep, also on a worker that just joined
    if action == "rollback":
        return (
            f"rolled back {current} -> {version}",
            f"rolled back from {current} to {version} on {len(conf['targets'])} host(s)",
        )
    if not moved:
        return None, f"every target serves {version}, the desired release"
    what = {v: "the canary" for v, _ in plan[1:]} | {version: "the desired release"}
    now = "; ".join(
        f"{', '.join(n for n in moved if moved[n] == v)} now serve {v}, {what[v]}"
        for v in dict.fromkeys(moved.values())
    )
    return f"synced: {now}", now


def reported(conf: dict, label: str, change: Callable[[], tuple[str | None, str]]) -> int:
    """Run a change command: log and say its outcome, or say why it was refused (exit status 1)."""
    try:
        logged, outcome = change()
    except Refused as exc:
        say(f"{label} REFUSED: {exc}")
        return 1
    if logged:
        log(conf, logged)
    say(outcome)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = (
        "usage: deploy_hook.py pre-receive|post-receive|rollback [X.Y.Z]|sync|canary promote|abort|status"
        "|attest [X.Y.Z]|promote ATTESTATION ARCHIVE"
    )
    verbs = ("pre-receive", "post-receive", "rollback", "sync", "canary", "attest", "promote")
    if not argv or argv[0] not in verbs:
        print(usage, file=sys.stderr)
        return 2
    conf = load_config()
    try:
        if argv[0] == "attest":
            if len(argv) > 2 or (argv[1:] and not SEMVER.match(argv[1])):
                print(usage, file=sys.stderr)
                return 2
            return reported(conf, "ATTEST", lambda: attest(conf, (argv[1:] or [None])[0]))
        if argv[0] == "promote":
            if len(argv) != 3:
                print(usage, file=sys.stderr)
                return 2
            return reported(conf, "PROMOTION", lambda: promote(conf, Path(argv[1]), Path(argv[2])))
        if argv[0] == "canary":
            if argv[1:] == ["status"]:
                return canary_status(conf)
            if argv[1:] not in (["promote"], ["abort"]):
                print(usage, file=sys.stderr)
                return 2
            return reported(conf, f"CANARY {argv[1].upper()}", lambda: end_canary(conf, argv[1]))
        if argv[0] in ("rollback", "sync"):
            version = argv[1] if len(argv) > 1 and argv[1] else None
            if version and (argv[0] == "sync" or not SEMVER.match(version)):
                print(usage, file=sys.stderr)
                return 2
            return reported(conf, argv[0].upper(), lambda: serve_desired(conf, argv[0], version))
        lines = [ln for ln in sys.stdin.read().splitlines() if ln.strip()]
        return pre_receive(conf, lines) if argv[0] == "pre-receive" else post_receive(conf, lines)
    finally:
        close_connections(conf)


if __name__ == "__main__":
    sys.exit(main())
