"""``modelserve-edge-train``: train the RUL regressor on simulator data and export a model directory.

Training data: ``--engines`` engines x ``--runs`` units each, simulated to failure with ``--data-seed``
(a different seed from the simulator's default, so the shipped model is evaluated on unseen units).
Target: cycles left, clipped at ``--rul-cap`` (the usual piecewise-linear RUL: a healthy engine's
remaining life cannot be read off its sensors). Tiny MLP, fixed seed, CPU.

Writes ``model.tflite`` (LiteRT), ``weights.npz`` (numpy forward pass) and ``metadata.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from modelserve_edge import __version__
from modelserve_edge.simulator import trajectory

HIDDEN = (32, 16)


def dataset(seed: int, engines: int, runs: int, rul_cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, clipped RUL, engine id) for every reading of every simulated unit."""
    xs, ys, groups = [], [], []
    for engine in range(1, engines + 1):
        for unit in range(1, runs + 1):
            t = trajectory(seed, engine, unit)
            xs.append(np.column_stack([t.settings, t.sensors, t.cycles]))
            ys.append(np.minimum(t.rul, rul_cap))
            groups.append(np.full(t.life, engine))
    return np.concatenate(xs), np.concatenate(ys).astype(np.float64), np.concatenate(groups)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_model(seed: int):
    import keras

    from modelserve_edge.rul_model import N_FEATURES

    init = keras.initializers.GlorotUniform(seed=seed)
    layers = [keras.Input(shape=(N_FEATURES,), name="features")]
    layers += [keras.layers.Dense(n, activation="relu", kernel_initializer=init) for n in HIDDEN]
    layers.append(keras.layers.Dense(1, activation="linear", kernel_initializer=init, name="rul"))
    model = keras.Sequential(layers, name="turbofan_rul")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.003), loss="mse")
    return model


def export_tflite(model, path: Path) -> None:
    """Through a SavedModel, which keeps the batch dimension dynamic (resize_tensor_input)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="edge-export-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(tmp).convert())


def train(
    out: Path,
    *,
    seed: int = 42,
    data_seed: int = 1000,
    engines: int = 60,
    runs: int = 1,
    validation_engines: int = 12,
    epochs: int = 60,
    rul_cap: float = 125.0,
    version: str = __version__,
) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    import keras
    import tensorflow as tf

    from modelserve_edge.rul_model import FEATURES, LiteRtRulModel, NumpyRulModel

    keras.utils.set_random_seed(seed)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    with contextlib.suppress(Exception):
        tf.config.experimental.enable_op_determinism()

    x, y, groups = dataset(data_seed, engines, runs, rul_cap)
    val = groups > engines - validation_engines
    mean = x[~val].mean(axis=0)
    std = x[~val].std(axis=0)
    std[std < 1e-9] = 1.0  # flat sensors
    z = ((x - mean) / std).astype(np.float32)

    model = build_model(seed)
    model.fit(z[~val], y[~val].astype(np.float32), epochs=epochs, batch_size=64, verbose=0, shuffle=True)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    weights = {"mean": mean, "std": std}
    for i, layer in enumerate(dense):
        kernel, bias = layer.get_weights()
        weights[f"kernel_{i}"], weights[f"bias_{i}"] = kernel, bias
    np.savez(out / "weights.npz", **weights)
    export_tflite(model, out / "model.tflite")

    keras_pred = np.clip(model.predict(z[val], verbose=0).reshape(-1), 0, rul_cap)
    metadata = {
        "name": "turbofan-rul",
        "version": version,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "features": FEATURES,
        "activations": [layer.get_config()["activation"] for layer in dense],
        "hidden_units": list(HIDDEN),
        "rul_cap": rul_cap,
        "training": {
            "seed": seed,
            "data_seed": data_seed,
            "engines": engines,
            "runs_per_engine": runs,
            "validation_engines": validation_engines,
            "epochs": epochs,
            "train_rows": int((~val).sum()),
            "validation_rows": int(val.sum()),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "files": {},
        "metrics": {},
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    lite = LiteRtRulModel(out).predict(x[val])
    numpy_pred = NumpyRulModel(out).predict(x[val])
    metadata["metrics"] = {
        "validation_rmse_keras": round(rmse(keras_pred, y[val]), 3),
        "validation_rmse_litert": round(rmse(lite, y[val]), 3),
        "validation_rmse_numpy": round(rmse(numpy_pred, y[val]), 3),
        "max_abs_diff_litert_numpy": float(np.max(np.abs(lite - numpy_pred))),
    }
    metadata["files"] = {name: sha256_file(out / name) for name in ("model.tflite", "weights.npz")}
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-seed", type=int, default=1000)
    parser.add_argument("--engines", type=int, default=60)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--validation-engines", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rul-cap", type=float, default=125.0)
    parser.add_argument("--version", default=__version__)
    a = parser.parse_args(argv)
    meta = train(
        a.out,
        seed=a.seed,
        data_seed=a.data_seed,
        engines=a.engines,
        runs=a.runs,
        validation_engines=a.validation_engines,
        epochs=a.epochs,
        rul_cap=a.rul_cap,
        version=a.version,
    )
    print(json.dumps(meta["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
