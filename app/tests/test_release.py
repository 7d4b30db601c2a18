import json
import os

import ms_devstack as devstack
import pytest
from modelserve import release
from modelserve.release import ReleaseError, activate, current_version, list_releases, main, rollback


def test_seed_release_validates(seed_release):
    meta = release.validate_release(seed_release)
    assert meta["version"] == "1.0.0"
    assert meta["metrics"]["heldout_accuracy"] > 0.65
    assert meta["metrics"]["heldout_auc"] > 0.7
    size = sum(p.stat().st_size for p in seed_release.iterdir())
    assert size < 200_000  # stays small enough to live in git


def test_validate_cli_ok(seed_release, capsys):
    assert main(["validate", str(seed_release)]) == 0
    assert "ok:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.tflite").write_bytes(b"garbage"), "sha256 mismatch"),
        (lambda d: (d / "model.keras").unlink(), "model.keras missing"),
        (lambda d: (d / "metadata.json").unlink(), "metadata.json: missing"),
        (lambda d: (d / "metadata.json").write_text("{not json"), "not JSON"),
        (lambda d: _edit(d, version="one"), "not a semantic version"),
        (lambda d: _edit(d, features=["glucose"]), "features must be"),
        (lambda d: _edit(d, input={"shape": [None, 7]}), "shapes"),
        (lambda d: _edit(d, metrics={"heldout_accuracy": 3, "heldout_auc": 0.8}), "heldout_accuracy"),
    ],
)
def test_validate_rejects_broken_releases(copy_seed, capsys, damage, message):
    rel = copy_seed()
    damage(rel)
    with pytest.raises(ReleaseError, match=message):
        release.validate_release(rel)
    assert main(["validate", str(rel)]) == 1
    assert message.split()[0] in capsys.readouterr().err


def test_validate_rejects_a_tflite_that_does_not_load(copy_seed):
    rel = copy_seed()
    (rel / "model.tflite").write_bytes(b"\x00" * 64)
    meta = json.loads((rel / "metadata.json").read_text())
    meta["files"]["model.tflite"]["sha256"] = release.sha256_file(rel / "model.tflite")
    (rel / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ReleaseError, match="does not load"):
        release.validate_release(rel)


def _profile(rel, change):
    """Edit the release's drift profile and re-checksum it (a well-listed, malformed profile)."""
    path = rel / "drift_profile.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    meta = json.loads((rel / "metadata.json").read_text())
    meta["files"]["drift_profile.json"]["sha256"] = release.sha256_file(path)
    (rel / "metadata.json").write_text(json.dumps(meta))


def _unlist_profile(rel):
    meta = json.loads((rel / "metadata.json").read_text())
    del meta["files"]["drift_profile.json"]
    (rel / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "drift_profile.json").write_text("{}"), "drift_profile.json: sha256 mismatch"),
        (lambda d: (d / "drift_profile.json").unlink(), "drift_profile.json missing"),
        (_unlist_profile, "drift_profile.json is not listed in files"),
        (lambda d: _profile(d, lambda p: p["columns"].pop("score")), "columns must be"),
        (lambda d: _profile(d, lambda p: p["columns"]["glucose"]["edges"].reverse()), "glucose.edges must"),
        (lambda d: _profile(d, lambda p: p["columns"]["bmi"]["proportions"].append(0.5)), "bmi.proportions"),
        (lambda d: _profile(d, lambda p: p["columns"]["age"]["cdf"].__setitem__(-1, 0.5)), "age.cdf must"),
        (lambda d: _profile(d, lambda p: p.update(rows=0)), "rows must be a positive integer"),
    ],
)
def test_validate_checks_the_drift_profile(copy_seed, damage, message):
    rel = copy_seed()
    damage(rel)
    with pytest.raises(ReleaseError, match=message):
        release.validate_release(rel)


def test_a_release_without_a_drift_profile_is_valid_and_installs_without_one(copy_seed, tmp_path):
    """Releases made before drift detection still serve (drift is off for them)."""
    rel = copy_seed()
    (rel / "drift_profile.json").unlink()
    _unlist_profile(rel)
    release.validate_release(rel)
    assert release.install(tmp_path / "models", rel) == "1.0.0"
    assert not (tmp_path / "models" / "releases" / "1.0.0" / "drift_profile.json").exists()


def test_install_copies_the_drift_profile(seed_release, tmp_path):
    release.install(tmp_path / "models", seed_release)
    installed = tmp_path / "models" / "releases" / "1.0.0"
    profile = "drift_profile.json"
    assert (installed / profile).read_bytes() == (seed_release / profile).read_bytes()
    release.validate_release(installed)


def _edit(rel, **changes):
    meta = json.loads((rel / "metadata.json").read_text())
    meta.update(changes)
    (rel / "metadata.json").write_text(json.dumps(meta))


def test_activate_rollback_list_current(model_dir, seed_release, capsys):
    devstack.install_release(model_dir, seed_release, "1.1.0")
    devstack.install_release(model_dir, seed_release, "1.0.10")
    assert list_releases(model_dir) == ["1.0.0", "1.0.10", "1.1.0"]  # semantic, not lexical order
    assert current_version(model_dir) == "1.0.0"
    assert os.readlink(model_dir / "current") == "releases/1.0.0"  # relative

    assert activate(model_dir, "1.1.0") == "1.0.0"
    assert os.readlink(model_dir / "current") == "releases/1.1.0"
    assert (model_dir / "current" / "metadata.json").is_file()
    assert rollback(model_dir) == "1.0.0"
    assert current_version(model_dir) == "1.0.0"
    assert rollback(model_dir) == "1.1.0"  # previous now points at 1.1.0

    os.unlink(model_dir / "previous")
    assert rollback(model_dir) == "1.0.10"  # without history: highest version below current

    assert main(["--model-dir", str(model_dir), "activate", "1.1.0"]) == 0
    assert main(["--model-dir", str(model_dir), "current"]) == 0
    assert main(["--model-dir", str(model_dir), "list"]) == 0
    out = capsys.readouterr().out
    assert "1.0.10 -> 1.1.0" in out
    assert "* 1.1.0" in out
    assert not list((model_dir).glob(".*tmp"))  # no leftovers from the atomic flip


def test_activate_refuses_unknown_or_invalid(model_dir, seed_release, capsys):
    with pytest.raises(ReleaseError, match=r"no release '9\.9\.9'"):
        activate(model_dir, "9.9.9")
    devstack.install_release(model_dir, seed_release, "2.0.0")
    (model_dir / "releases" / "2.0.0" / "model.tflite").write_bytes(b"x")
    assert main(["--model-dir", str(model_dir), "activate", "2.0.0"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert current_version(model_dir) == "1.0.0"  # unchanged


def test_activate_refuses_version_mismatch(model_dir, seed_release):
    (model_dir / "releases" / "3.0.0").mkdir()
    for f in (seed_release).iterdir():
        (model_dir / "releases" / "3.0.0" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ReleaseError, match="!= directory name"):
        activate(model_dir, "3.0.0")


def test_rollback_with_nothing_older(model_dir):
    with pytest.raises(ReleaseError, match="nothing to roll back"):
        rollback(model_dir)
    assert main(["--model-dir", str(model_dir), "rollback"]) == 1


def test_current_without_release(tmp_path, capsys):
    assert main(["--model-dir", str(tmp_path), "current"]) == 1
    assert "no current release" in capsys.readouterr().err


def test_install_copies_and_refuses_overwrite(tmp_path, seed_release, copy_seed):
    md = tmp_path / "m"
    assert release.install(md, seed_release, do_activate=True) == "1.0.0"
    assert current_version(md) == "1.0.0"
    # The same release again (a re-run of an interrupted deploy) is fine...
    assert release.install(md, seed_release) == "1.0.0"
    # ...a different release under the same version is not.
    other = copy_seed()
    _edit(other, description="something else")
    with pytest.raises(ReleaseError, match="immutable"):
        release.install(md, other)
    # Installed read-only; prune still removes an old one whole.
    installed = md / "releases" / "1.0.0"
    assert installed.stat().st_mode & 0o777 == 0o555
    assert {(p.stat().st_mode & 0o777) for p in installed.iterdir()} == {0o444}
    for v in ("1.1.0", "1.2.0", "1.3.0"):
        _edit(other, version=v)
        release.install(md, other, do_activate=True)
    assert release.prune(md, keep=2) == ["1.0.0", "1.1.0"] and not installed.exists()


def test_prune_keeps_the_newest_and_never_current_or_previous(model_dir, seed_release, capsys):
    for v in ("1.1.0", "1.2.0", "1.3.0", "1.4.0"):
        devstack.install_release(model_dir, seed_release, v)
    activate(model_dir, "1.1.0")  # previous -> 1.0.0, the oldest
    assert release.prune(model_dir, keep=2) == ["1.2.0"]
    assert list_releases(model_dir) == ["1.0.0", "1.1.0", "1.3.0", "1.4.0"]
    assert main(["--model-dir", str(model_dir), "prune", "--keep", "1"]) == 1
    assert "keep at least 2" in capsys.readouterr().err


def test_evaluate_measures_on_the_given_rows_not_the_metadata(copy_seed, capsys, monkeypatch):
    import io

    from conftest import DATA

    claimed = copy_seed()
    meta = json.loads((claimed / "metadata.json").read_text())
    meta["metrics"].update(heldout_accuracy=0.01, heldout_auc=0.01)  # ignored: only rows count
    (claimed / "metadata.json").write_text(json.dumps(meta))
    assert main(["evaluate", str(claimed), "--against", str(claimed), "--data", str(DATA)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["candidate"] == figures["served"]
    assert figures["candidate"]["rows"] == 765 and figures["candidate"]["accuracy"] > 0.7
    # Labels flipped: the same model measures badly, from standard input (how the gate's sandbox reads).
    flipped = "".join(
        f"{line.rsplit(',', 1)[0]},{1 - int(float(line.rsplit(',', 1)[1]))}\n" for line in DATA.open()
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(flipped))
    assert main(["evaluate", str(claimed), "--data", "-"]) == 0
    bad = json.loads(capsys.readouterr().out)
    assert bad["served"] is None and bad["candidate"]["accuracy"] < 0.3 and bad["candidate"]["auc"] < 0.2


def test_evaluate_refuses_unusable_rows_and_a_tampered_release(copy_seed, tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("1,2,3\n")
    rel = copy_seed()
    assert main(["evaluate", str(rel), "--data", str(rows)]) == 1
    assert "expected 9 columns" in capsys.readouterr().err
    rows.write_text("1,120,70,20,80,30,0.4,35,1\n1,120,70,20,80,30,0.4,35,1\n")
    assert main(["evaluate", str(rel), "--data", str(rows)]) == 1
    assert "both classes" in capsys.readouterr().err
    (rel / "model.tflite").write_bytes(b"x")  # what is measured must be what the metadata lists
    rows.write_text("1,120,70,20,80,30,0.4,35,1\n1,90,70,20,80,22,0.2,25,0\n")
    assert main(["evaluate", str(rel), "--data", str(rows)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
