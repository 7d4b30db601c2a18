"""The RUL regressor at inference time: shared preprocessing, a LiteRT backend and a pure-numpy
forward pass over the exported weights (32-bit ARM has no LiteRT wheel). Both backends get the same
standardised float32 input and apply the same clipping, so they agree to float32 rounding.

Model directory (``modelserve-edge-train`` writes it; a trained one ships in ``model/``):
``model.tflite``, ``weights.npz`` (``mean``, ``std``, ``kernel_<i>``, ``bias_<i>``) and
``metadata.json`` (features, activations, ``rul_cap``, version, metrics).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from modelserve_edge.simulator import N_SENSORS, N_SETTINGS

log = logging.getLogger(__name__)

FEATURES = (
    [f"setting{i}" for i in range(1, N_SETTINGS + 1)] + [f"s{i}" for i in range(1, N_SENSORS + 1)] + ["cycle"]
)
N_FEATURES = len(FEATURES)


def default_model_dir() -> Path:
    return Path(str(resources.files("modelserve_edge").joinpath("model")))


def features(message: dict) -> np.ndarray:
    """One reading (simulator message) as a float64 feature row; ValueError if malformed."""
    try:
        settings = [float(v) for v in message["settings"]]
        sensors = [float(v) for v in message["sensors"]]
        cycle = float(message["cycle"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a sensor reading: {exc!r}") from None
    if len(settings) != N_SETTINGS or len(sensors) != N_SENSORS:
        raise ValueError(f"expected {N_SETTINGS} settings and {N_SENSORS} sensors")
    row = np.array([*settings, *sensors, cycle], dtype=np.float64)
    if not np.isfinite(row).all():
        raise ValueError("non-finite value in reading")
    return row


class RulModel:
    backend = "?"

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.metadata = json.loads((self.model_dir / "metadata.json").read_text())
        if self.metadata.get("features") != FEATURES:
            raise ValueError(f"{model_dir}: model features do not match this code's feature list")
        with np.load(self.model_dir / "weights.npz") as w:
            self.weights = {k: w[k] for k in w.files}
        self.mean = self.weights["mean"].astype(np.float64)
        self.std = self.weights["std"].astype(np.float64)
        self.rul_cap = float(self.metadata["rul_cap"])
        self.version = str(self.metadata.get("version", "unknown"))

    def standardize(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, N_FEATURES)
        return ((x - self.mean) / self.std).astype(np.float32)

    def raw(self, z: np.ndarray) -> np.ndarray:
        """Network output for standardised float32 input, shape (n,)."""
        raise NotImplementedError

    def predict(self, x: np.ndarray | Sequence) -> np.ndarray:
        """RUL in cycles for raw feature rows, clipped to [0, rul_cap]."""
        return np.clip(self.raw(self.standardize(x)).astype(np.float64), 0.0, self.rul_cap)


class NumpyRulModel(RulModel):
    backend = "numpy"

    def __init__(self, model_dir: Path):
        super().__init__(model_dir)
        self.activations = list(self.metadata["activations"])
        self.layers = [
            (self.weights[f"kernel_{i}"].astype(np.float32), self.weights[f"bias_{i}"].astype(np.float32))
            for i in range(len(self.activations))
        ]

    def raw(self, z: np.ndarray) -> np.ndarray:
        h = z
        for (kernel, bias), activation in zip(self.layers, self.activations, strict=True):
            h = h @ kernel + bias
            if activation == "relu":
                h = np.maximum(h, 0.0)
            elif activation != "linear":
                raise ValueError(f"unsupported activation {activation!r}")
        return h.reshape(-1)


class LiteRtRulModel(RulModel):
    backend = "litert"

    def __init__(self, model_dir: Path):
        super().__init__(model_dir)
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(self.model_dir / "model.tflite"), num_threads=1)
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self._batch = 0

    def raw(self, z: np.ndarray) -> np.ndarray:
        if z.shape[0] != self._batch:
            self.interpreter.resize_tensor_input(self.input_index, list(z.shape), strict=False)
            self.interpreter.allocate_tensors()
            self._batch = z.shape[0]
        self.interpreter.set_tensor(self.input_index, z)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output_index)).reshape(-1)


def litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(model_dir: str | Path | None = None, backend: str = "auto") -> RulModel:
    """``backend``: ``litert``, ``numpy`` or ``auto`` (LiteRT when importable, else numpy)."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if backend == "auto":
        backend = "litert" if litert_available() else "numpy"
    if backend == "litert":
        return LiteRtRulModel(model_dir)
    if backend == "numpy":
        return NumpyRulModel(model_dir)
    raise ValueError(f"unknown backend {backend!r} (expected auto, litert or numpy)")
