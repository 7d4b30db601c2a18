"""Model releases on disk and the ``modelserve-release`` command.

Layout (the Ansible role and the git hooks rely on it)::

    $MODELSERVE_MODEL_DIR/releases/<version>/{model.keras,model.tflite,metadata.json[,drift_profile.json]}
    $MODELSERVE_MODEL_DIR/current  -> releases/<version>   (relative symlink, flipped with rename)
    $MODELSERVE_MODEL_DIR/previous -> releases/<version>   (what ``rollback`` goes back to)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from modelserve.drift import PROFILE, check_profile
from modelserve.features import FEATURES, N_FEATURES

METADATA = "metadata.json"
MODEL_FILES = ("model.keras", "model.tflite")
# Files a release may carry, checksummed in metadata.json like the model's: the reference profile
# of drift detection (modelserve.drift). A release without one serves, with drift off.
OPTIONAL_FILES = (PROFILE,)
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:[-+][0-9A-Za-z.-]+)?$")
RELEASES = "releases"
CURRENT = "current"
PREVIOUS = "previous"


class ReleaseError(Exception):
    """A release is missing, inconsistent, or cannot be activated."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def release_digest(release_dir: Path) -> str:
    """One checksum of a release's bytes: every file's path and sha256, in order. Two environments
    serve the same release exactly when their digests are equal."""
    release_dir = Path(release_dir)
    manifest = hashlib.sha256()
    for path in sorted(p for p in release_dir.rglob("*") if p.is_file()):
        manifest.update(f"{path.relative_to(release_dir).as_posix()}\0{sha256_file(path)}\n".encode())
    return "sha256:" + manifest.hexdigest()


def version_key(version: str) -> tuple:
    match = SEMVER.match(version)
    if not match:
        return (-1, -1, -1, version)
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)), version)


def read_metadata(release_dir: Path) -> dict[str, Any]:
    path = Path(release_dir) / METADATA
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReleaseError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"{path}: unreadable or not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ReleaseError(f"{path}: must hold a JSON object")
    return data


def validate_release(release_dir: Path, *, load: bool = True) -> dict[str, Any]:
    """Check a release directory; return its metadata or raise ReleaseError naming every problem."""
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise ReleaseError(f"{release_dir}: not a directory")
    meta = read_metadata(release_dir)
    problems: list[str] = []
    version = meta.get("version")
    if not isinstance(version, str) or not SEMVER.match(version):
        problems.append(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    if meta.get("features") != list(FEATURES):
        problems.append(f"features must be {list(FEATURES)}, got {meta.get('features')!r}")
    shapes = (meta.get("input") or {}).get("shape"), (meta.get("output") or {}).get("shape")
    if shapes != ([None, N_FEATURES], [None, 1]):
        problems.append(f"input/output shapes must be [null, {N_FEATURES}] / [null, 1], got {shapes}")
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict):
        problems.append("metrics missing")
    else:
        for key in ("heldout_accuracy", "heldout_auc"):
            value = metrics.get(key)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                problems.append(f"metrics.{key} must be a number in [0, 1], got {value!r}")
    files = meta.get("files")
    if not isinstance(files, dict):
        problems.append("files (name -> sha256) missing")
        files = {}
    for name in MODEL_FILES:
        entry = files.get(name)
        path = release_dir / name
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(f"files.{name}.sha256 missing")
        elif not path.is_file():
            problems.append(f"{name} missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 mismatch (file changed after training?)")
    extra = sorted(set(files) - set(MODEL_FILES) - set(OPTIONAL_FILES))
    if extra:
        problems.append(f"files lists unexpected entries {extra}")
    problems.extend(_check_profile(release_dir, files.get(PROFILE)))
    if not problems and load:
        problems.extend(_check_tflite(release_dir / "model.tflite"))
    if problems:
        raise ReleaseError(f"{release_dir}: invalid release:\n  - " + "\n  - ".join(problems))
    return meta


def _check_profile(release_dir: Path, entry: Any) -> list[str]:
    """The drift profile, when the release has one: listed with its checksum, and well-formed."""
    path = release_dir / PROFILE
    if entry is None:
        return [f"{PROFILE} is not listed in files (name -> sha256)"] if path.exists() else []
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return [f"files.{PROFILE}.sha256 missing"]
    if not path.is_file():
        return [f"{PROFILE} missing (listed in files)"]
    if sha256_file(path) != entry["sha256"]:
        return [f"{PROFILE}: sha256 mismatch (file changed after training?)"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{PROFILE}: unreadable or not JSON: {exc}"]
    return [f"{PROFILE}: {problem}" for problem in check_profile(data)]


def release_files(meta: dict[str, Any]) -> tuple[str, ...]:
    """Every file of a (validated) release: the model's, its optional ones it lists, metadata."""
    listed = meta.get("files") or {}
    return (*MODEL_FILES, *(name for name in OPTIONAL_FILES if name in listed), METADATA)


def _check_tflite(path: Path) -> list[str]:
    try:
        from modelserve.litert import TFLiteModel
    except ImportError as exc:  # pragma: no cover - depends on the install
        return [f"cannot check model.tflite: {exc} (install modelserve[worker])"]
    try:
        model = TFLiteModel(path)
        probs = model.predict([[1.0, 120.0, 70.0, 20.0, 80.0, 30.0, 0.4, 35.0]] * 3)
    except Exception as exc:
        return [f"model.tflite does not load or run: {exc}"]
    if len(probs) != 3 or not all(0.0 <= p <= 1.0 for p in probs):
        return [f"model.tflite output is not 3 probabilities: {probs!r}"]
    return []


# --- the model directory -----------------------------------------------------------------------


def releases_dir(model_dir: Path) -> Path:
    return Path(model_dir) / RELEASES


def list_releases(model_dir: Path) -> list[str]:
    root = releases_dir(model_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=version_key)


def _link_version(model_dir: Path, name: str) -> str | None:
    try:
        target = os.readlink(Path(model_dir) / name)
    except OSError:
        return None
    return Path(target).name


def current_version(model_dir: Path) -> str | None:
    return _link_version(model_dir, CURRENT)


def _flip(model_dir: Path, name: str, version: str) -> None:
    link = Path(model_dir) / name
    tmp = Path(model_dir) / f".{name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(f"{RELEASES}/{version}", tmp)
    os.replace(tmp, link)  # rename(2): readers see the old or the new target, never nothing


def activate(model_dir: Path, version: str, *, validate: bool = True, load: bool = True) -> str | None:
    """Point ``current`` at releases/<version>; remember the old one as ``previous``. `load=False`
    checks metadata and checksums only (for a release `install` loaded on this host already)."""
    model_dir = Path(model_dir)
    target = releases_dir(model_dir) / version
    if not target.is_dir():
        known = ", ".join(list_releases(model_dir)) or "none"
        raise ReleaseError(f"no release {version!r} in {releases_dir(model_dir)} (known: {known})")
    if validate:
        meta = validate_release(target, load=load)
        if meta.get("version") != version:
            raise ReleaseError(f"{target}: metadata version {meta.get('version')!r} != directory name")
    old = current_version(model_dir)
    if old and old != version:
        _flip(model_dir, PREVIOUS, old)
    _flip(model_dir, CURRENT, version)
    return old


def rollback(model_dir: Path) -> str:
    """Go back to ``previous`` (or, without it, the highest version below the current one)."""
    model_dir = Path(model_dir)
    cur = current_version(model_dir)
    prev = _link_version(model_dir, PREVIOUS)
    if not prev or prev == cur or not (releases_dir(model_dir) / prev).is_dir():
        older = [v for v in list_releases(model_dir) if cur is None or version_key(v) < version_key(cur)]
        if not older:
            raise ReleaseError(f"nothing to roll back to from {cur!r} in {model_dir}")
        prev = older[-1]
    activate(model_dir, prev)
    return prev


def install(model_dir: Path, source: Path, *, do_activate: bool = False) -> str:
    """Validate a release directory and copy it to releases/<version> (refusing to overwrite)."""
    meta = validate_release(source)
    version = meta["version"]
    dest = releases_dir(model_dir) / version
    if dest.exists():
        # A re-run of an interrupted deploy ships the same release again: that is not a conflict.
        if (dest / METADATA).is_file() and read_metadata(dest) == meta:
            return version
        raise ReleaseError(f"{dest} already exists; releases are immutable, bump the version")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{version}.{os.getpid()}.tmp"
    if tmp.exists():
        tmp.chmod(0o755)
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in release_files(meta):
        shutil.copyfile(Path(source) / name, tmp / name)
        (tmp / name).chmod(0o444)
    tmp.chmod(0o555)  # immutable: nothing changes a release once installed (prune removes it whole)
    os.replace(tmp, dest)
    if do_activate:
        activate(model_dir, version)
    return version


def prune(model_dir: Path, keep: int) -> list[str]:
    """Delete the oldest releases beyond `keep`, never the current or previous one."""
    if keep < 2:
        raise ReleaseError("keep at least 2 releases (the current one and one to roll back to)")
    model_dir = Path(model_dir)
    protected = {current_version(model_dir), _link_version(model_dir, PREVIOUS)}
    versions = list_releases(model_dir)  # oldest first
    removed = []
    for version in versions[: max(0, len(versions) - keep)]:
        if version in protected:
            continue
        path = releases_dir(model_dir) / version
        path.chmod(0o755)  # installed read-only: its entries can only go once it is writable again
        shutil.rmtree(path)
        removed.append(version)
    return removed


# --- CLI -----------------------------------------------------------------------------------------


def _model_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("MODELSERVE_MODEL_DIR") or "/srv/modelserve")


def _evaluate(args: argparse.Namespace) -> int:
    from modelserve import evaluate  # numpy and LiteRT: only for this command

    try:
        x, y = evaluate.load_csv(sys.stdin if args.data == "-" else Path(args.data))
        result = {
            "candidate": evaluate.measure(Path(args.release_dir), x, y),
            "served": evaluate.measure(Path(args.against), x, y) if args.against else None,
        }
    except (OSError, ValueError) as exc:
        print(f"modelserve-release evaluate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modelserve-release", description="Validate, list and switch model releases."
    )
    parser.add_argument(
        "--model-dir", help="model directory (default: $MODELSERVE_MODEL_DIR or /srv/modelserve)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a release directory (metadata, checksums, tflite)")
    p.add_argument("release_dir")
    p.add_argument("--no-load", action="store_true", help="skip loading model.tflite")
    p = sub.add_parser("activate", help="point current at releases/<version> (atomic)")
    p.add_argument("version")
    sub.add_parser("rollback", help="re-activate the previous release")
    sub.add_parser("list", help="list releases, marking the current one")
    sub.add_parser("current", help="print the current version")
    p = sub.add_parser("prune", help="delete the oldest releases, keeping current and previous")
    p.add_argument("--keep", type=int, default=5)
    p = sub.add_parser("install", help="validate a release dir and copy it into releases/<version>")
    p.add_argument("release_dir")
    p.add_argument("--activate", action="store_true")
    p = sub.add_parser("digest", help="print one checksum of a release's bytes (compare environments)")
    p.add_argument("release", help="a release directory, or a version installed here")
    p = sub.add_parser(
        "evaluate", help="measure accuracy and AUC of releases on labelled rows; print JSON (the gate)"
    )
    p.add_argument("release_dir", help="the release to measure (the candidate)")
    p.add_argument("--against", help="also measure this release (the served one) on the same rows")
    p.add_argument(
        "--data",
        required=True,
        help="CSV of 8 features then a 0/1 label, or - for standard input (how the gate's sandbox gets it)",
    )
    args = parser.parse_args(argv)
    model_dir = _model_dir(args.model_dir)
    try:
        if args.command == "validate":
            meta = validate_release(Path(args.release_dir), load=not args.no_load)
            m = meta["metrics"]
            print(
                f"ok: {args.release_dir} is release {meta['version']} "
                f"(held-out accuracy {m['heldout_accuracy']:.3f}, AUC {m['heldout_auc']:.3f})"
            )
        elif args.command == "activate":
            # Checksums before the flip; no second model load on the deploy's critical path: every
            # change installs (which loads the model on this host) before it activates, and an
            # installed release is immutable.
            old = activate(model_dir, args.version, load=False)
            # Read back after the flip: what this host now serves, in its own words (the git hook's
            # confirmation that the switch took here).
            print(f"current: {old or 'none'} -> {args.version}\nserving {current_version(model_dir)}")
        elif args.command == "rollback":
            old = current_version(model_dir)
            new = rollback(model_dir)
            print(f"current: {old or 'none'} -> {new}")
        elif args.command == "list":
            cur = current_version(model_dir)
            for version in list_releases(model_dir):
                print(f"{'*' if version == cur else ' '} {version}")
        elif args.command == "current":
            cur = current_version(model_dir)
            if cur is None:
                print(f"no current release in {model_dir}", file=sys.stderr)
                return 1
            print(cur)
        elif args.command == "prune":
            removed = prune(model_dir, args.keep)
            print(f"removed: {', '.join(removed) or 'nothing'}")
        elif args.command == "install":
            version = install(model_dir, Path(args.release_dir), do_activate=args.activate)
            print(f"installed {version}{' and activated' if args.activate else ''}")
        elif args.command == "digest":
            path = Path(args.release)
            path = path if path.is_dir() else releases_dir(model_dir) / args.release
            if not path.is_dir():
                raise ReleaseError(f"{args.release}: no such release directory or installed version")
            print(f"{release_digest(path)}  {path.name}")
        elif args.command == "evaluate":
            return _evaluate(args)
    except ReleaseError as exc:
        print(f"modelserve-release: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
