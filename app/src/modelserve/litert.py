"""One LiteRT interpreter of a ``model.tflite`` (numpy + ai-edge-litert; never TensorFlow).

Used by the workers (through :mod:`modelserve.model`), by ``modelserve-release validate`` to
load-check a release, and by training to compare the export with Keras.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from modelserve.features import N_FEATURES


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=1)


class TFLiteModel:
    """Resizes its input to the batch size (only when it changes); thread-safe via a lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._interp = _interpreter(self.path)
        inp = self._interp.get_input_details()
        out = self._interp.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise ValueError(f"expected 1 input and 1 output tensor, got {len(inp)} and {len(out)}")
        if list(inp[0]["shape"])[-1] != N_FEATURES:
            raise ValueError(f"input shape {list(inp[0]['shape'])} does not end in {N_FEATURES}")
        self._in = inp[0]["index"]
        self._out = out[0]["index"]
        self._rows = -1
        self._lock = threading.Lock()

    def predict(self, rows: Any) -> np.ndarray:
        """Probabilities (float32, one per row) of rows: nested lists or an (n, 8) array."""
        x = np.asarray(rows, dtype=np.float32).reshape(-1, N_FEATURES)
        n = x.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.float32)
        with self._lock:
            if n != self._rows:
                self._interp.resize_tensor_input(self._in, [n, N_FEATURES], strict=False)
                self._interp.allocate_tensors()
                self._rows = n
            self._interp.set_tensor(self._in, x)
            self._interp.invoke()
            y = self._interp.get_tensor(self._out)  # a copy: the next invoke cannot change it
        return y.reshape(n).astype(np.float32, copy=False)
