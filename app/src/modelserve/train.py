"""``modelserve-train``: train the Pima diabetes classifier and write one model release directory.

The release holds ``model.keras``, ``model.tflite`` (LiteRT, what the workers serve), the
reference profile of drift detection ``drift_profile.json`` (the training split's feature and score
distributions, see :mod:`modelserve.drift`) and a self-describing ``metadata.json``. Metrics are
measured on a held-out split never used in training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from modelserve.drift import PROFILE, build_profile
from modelserve.evaluate import load_csv, roc_auc
from modelserve.features import FEATURES, N_FEATURES
from modelserve.litert import TFLiteModel
from modelserve.release import SEMVER, sha256_file, validate_release
from modelserve.wire import DEFAULT_THRESHOLD, labels

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "pima-indians-diabetes.csv"


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), stratified by label, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in (0.0, 1.0):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def build_model(x_train: np.ndarray, seed: int):
    import keras

    norm = keras.layers.Normalization(name="standardize")
    norm.adapt(x_train)
    init = keras.initializers.GlorotUniform(seed=seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(N_FEATURES,), name="features"),
            norm,
            keras.layers.Dense(16, activation="relu", kernel_initializer=init),
            keras.layers.Dense(8, activation="relu", kernel_initializer=init),
            keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init, name="probability"),
        ],
        name="pima_diabetes",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.001),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def export_tflite(model, path: Path) -> None:
    """Export through a SavedModel (keeps the dynamic batch dimension for resize_tensor_input)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="modelserve-export-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        path.write_bytes(converter.convert())


def train(
    data: Path,
    release_dir: Path,
    version: str,
    *,
    epochs: int = 150,
    seed: int = 42,
    test_fraction: float = 0.2,
    batch_size: int = 32,
) -> dict:
    if not SEMVER.match(version):
        raise ValueError(f"--version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    with contextlib.suppress(Exception):
        tf.config.experimental.enable_op_determinism()

    x, y = load_csv(data)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    model = build_model(x_train, seed)
    model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)

    release_dir = Path(release_dir)
    if release_dir.exists() and any(release_dir.iterdir()):
        raise FileExistsError(f"{release_dir} exists and is not empty; releases are immutable")
    release_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=release_dir.parent))
    work.chmod(0o755)
    model.save(work / "model.keras")
    export_tflite(model, work / "model.tflite")

    probs = model.predict(x_test, verbose=0).reshape(-1)
    lite = TFLiteModel(work / "model.tflite")
    lite_probs = np.array(lite.predict(x_test))
    # The drift reference: the training rows and the scores the served (LiteRT) model gives them.
    write_profile(work / PROFILE, x_train, np.array(lite.predict(x_train)))
    metrics = {
        "heldout_accuracy": round(float((np.array(labels(probs)) == y_test).mean()), 4),
        "heldout_auc": round(roc_auc(y_test, probs), 4),
        "heldout_rows": len(test_idx),
        "train_rows": len(train_idx),
        "heldout_positive_rate": round(float(y_test.mean()), 4),
        "tflite_max_abs_diff": float(np.abs(lite_probs - probs).max()),
    }
    meta = {
        "name": "pima-diabetes",
        "version": version,
        "format": 1,
        "description": "Probability of diabetes (Pima Indians) from 8 clinical measurements",
        "features": list(FEATURES),
        "input": {"name": "features", "shape": [None, N_FEATURES], "dtype": "float32"},
        "output": {"name": "probability", "shape": [None, 1], "dtype": "float32"},
        "threshold": DEFAULT_THRESHOLD,
        "metrics": metrics,
        "training": {
            "data_file": Path(data).name,
            "data_sha256": sha256_file(Path(data)),
            "rows": len(y),
            "split": {"method": "stratified", "test_fraction": test_fraction, "seed": seed},
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
        },
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "libraries": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
        "files": {
            name: {"sha256": sha256_file(work / name), "bytes": (work / name).stat().st_size}
            for name in ("model.keras", "model.tflite", PROFILE)
        },
    }
    (work / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    validate_release(work)
    if release_dir.exists():
        release_dir.rmdir()
    os.replace(work, release_dir)
    return meta


def write_profile(path: Path, x_train: np.ndarray, scores: np.ndarray) -> None:
    profile = build_profile(x_train, scores)
    path.write_text(json.dumps(profile, separators=(",", ":")) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelserve-train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV: 8 features then 0/1 label")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("releases"),
        help="parent dir; release goes to <dir>/<version>",
    )
    parser.add_argument("--release-dir", type=Path, help="exact release directory (overrides --output-dir)")
    parser.add_argument("--version", required=True, help="semantic version of the release, e.g. 1.0.0")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    release_dir = args.release_dir or args.output_dir / args.version
    try:
        meta = train(
            args.data,
            release_dir,
            args.version,
            epochs=args.epochs,
            seed=args.seed,
            test_fraction=args.test_fraction,
        )
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"modelserve-train: {exc}", file=sys.stderr)
        return 1
    m = meta["metrics"]
    print(
        f"release {meta['version']} written to {release_dir}: held-out accuracy {m['heldout_accuracy']}, "
        f"AUC {m['heldout_auc']} ({m['heldout_rows']} rows)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
