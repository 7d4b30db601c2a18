import json

import numpy as np
import pytest
from modelserve import release, train

DATA = train.DEFAULT_DATA


def test_split_is_stratified_disjoint_and_deterministic():
    _, y = train.load_csv(DATA)
    tr, te = train.stratified_split(y, 0.2, seed=7)
    assert len(set(tr) & set(te)) == 0
    assert len(tr) + len(te) == len(y) == 765
    assert abs(y[te].mean() - y.mean()) < 0.01
    _, te2 = train.stratified_split(y, 0.2, seed=7)
    assert (te == te2).all()
    assert not np.array_equal(te, train.stratified_split(y, 0.2, seed=8)[1])


def test_roc_auc_known_values():
    assert train.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert train.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        train.roc_auc(np.array([1, 1]), np.array([0.2, 0.3]))


def test_bad_csv_is_rejected(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="columns"):
        train.load_csv(bad)


def test_fast_training_writes_a_valid_release(tmp_path):
    out = tmp_path / "out"
    rc = train.main(
        ["--data", str(DATA), "--output-dir", str(out), "--version", "0.1.0", "--epochs", "3", "--seed", "1"]
    )
    assert rc == 0
    rel = out / "0.1.0"
    assert sorted(p.name for p in rel.iterdir()) == [
        "drift_profile.json", "metadata.json", "model.keras", "model.tflite"
    ]  # fmt: skip
    meta = json.loads((rel / "metadata.json").read_text())
    assert meta["version"] == "0.1.0"
    assert meta["features"] == list(train.FEATURES)
    assert meta["input"]["shape"] == [None, 8] and meta["output"]["shape"] == [None, 1]
    for name in ("model.keras", "model.tflite", "drift_profile.json"):
        assert meta["files"][name]["sha256"] == release.sha256_file(rel / name)
    m = meta["metrics"]
    assert m["heldout_rows"] == 153 and m["train_rows"] == 612  # held-out only
    assert 0.0 <= m["heldout_accuracy"] <= 1.0 and 0.0 <= m["heldout_auc"] <= 1.0
    assert m["tflite_max_abs_diff"] < 1e-4  # the served LiteRT model agrees with Keras
    assert set(meta["libraries"]) >= {"tensorflow", "keras", "numpy", "python"}
    assert meta["training"]["seed"] == 1 and meta["trained_at"]
    release.validate_release(rel)
    # The drift reference: the training split's rows (612), every feature and the score.
    profile = json.loads((rel / "drift_profile.json").read_text())
    assert profile["rows"] == 612 and list(profile["columns"]) == [*train.FEATURES, "score"]
    # refuses to overwrite, rejects a non-semantic version
    assert (
        train.main(["--data", str(DATA), "--release-dir", str(rel), "--version", "0.1.0", "--epochs", "1"])
        == 1
    )
    assert (
        train.main(["--data", str(DATA), "--output-dir", str(out), "--version", "v1", "--epochs", "1"]) == 1
    )
