"""Serving-side model: LiteRT inference and hot switching between releases (numpy + LiteRT only)."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelserve.features import N_FEATURES
from modelserve.release import CURRENT, read_metadata, validate_release

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No release is active, or the active one cannot be loaded."""


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=1)


class TFLiteModel:
    """One LiteRT interpreter; resizes its input to the batch size (thread-safe via a lock)."""

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

    def predict(self, rows: Any) -> list[float]:
        x = np.asarray(rows, dtype=np.float32).reshape(-1, N_FEATURES)
        n = x.shape[0]
        if n == 0:
            return []
        with self._lock:
            if n != self._rows:
                self._interp.resize_tensor_input(self._in, [n, N_FEATURES], strict=False)
                self._interp.allocate_tensors()
                self._rows = n
            self._interp.set_tensor(self._in, x)
            self._interp.invoke()
            y = self._interp.get_tensor(self._out)
        return [float(p) for p in y.reshape(n)]


class LoadedModel:
    def __init__(self, release_dir: Path, *, validate: bool = True) -> None:
        self.release_dir = Path(release_dir)
        meta = validate_release(self.release_dir, load=False) if validate else read_metadata(release_dir)
        self.metadata = meta
        self.version: str = meta["version"]
        self.threshold = float(meta.get("threshold", 0.5))
        self.model = TFLiteModel(self.release_dir / "model.tflite")
        self.loaded_at = datetime.now(UTC).isoformat(timespec="seconds")

    def predict(self, rows: Any) -> dict[str, Any]:
        probs = self.model.predict(rows)
        return {
            "model_version": self.version,
            "probabilities": [round(p, 6) for p in probs],
            "labels": [int(p >= self.threshold) for p in probs],
        }

    def predict_packed(self, rows_b64: str) -> dict[str, Any]:
        """Rows as base64 float32 (protocol.pack_rows) in, probabilities as base64 float32 out."""
        import base64

        raw = base64.b64decode(rows_b64, validate=True)
        if not raw or len(raw) % (4 * N_FEATURES):
            raise ValueError(f"packed rows must be a non-empty multiple of {N_FEATURES} float32 values")
        x = np.frombuffer(raw, dtype=np.float32).reshape(-1, N_FEATURES)
        if not np.isfinite(x).all():
            raise ValueError("packed rows contain NaN or infinity")
        probs = np.asarray(self.model.predict(x), dtype=np.float32)
        return {
            "model_version": self.version,
            "threshold": self.threshold,
            "p32": base64.b64encode(probs.tobytes()).decode("ascii"),
        }

    def info(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "metrics": self.metadata.get("metrics", {}),
            "features": self.metadata.get("features"),
            "trained_at": self.metadata.get("trained_at"),
            "loaded_at": self.loaded_at,
            "release_dir": str(self.release_dir),
            "threshold": self.threshold,
        }


class ModelHolder:
    """Holds the model of ``<model_dir>/current`` and follows the symlink when it moves.

    ``get()`` is called once per task. It re-reads the symlink (one readlink) at most every
    ``check_interval`` seconds; when the target changed it loads the new release before
    swapping, so a task always gets a complete model and a bad release never replaces a good one.
    """

    def __init__(self, model_dir: Path, check_interval: float = 0.5) -> None:
        self.model_dir = Path(model_dir)
        self.check_interval = check_interval
        self._model: LoadedModel | None = None
        self._target: str | None = None
        self._failed_target: str | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        self.loads = 0

    def _readlink(self) -> str | None:
        try:
            return os.readlink(self.model_dir / CURRENT)
        except OSError:
            return None

    def get(self) -> LoadedModel:
        now = time.monotonic()
        if now >= self._next_check or self._model is None:
            with self._lock:
                if now >= self._next_check or self._model is None:
                    self._next_check = now + self.check_interval
                    self._refresh()
        if self._model is None:
            raise ModelUnavailable(f"no loadable release at {self.model_dir / CURRENT}")
        return self._model

    def _refresh(self) -> None:
        target = self._readlink()
        if target is None or target == self._target or target == self._failed_target:
            return
        try:
            model = LoadedModel(self.model_dir / target)
        except Exception as exc:
            self._failed_target = target
            log.error("cannot load release %s (keeping %s): %s", target, self._target, exc)
            return
        old = self._model.version if self._model else None
        self._model, self._target, self._failed_target = model, target, None
        self.loads += 1
        log.warning("model release switched: %s -> %s", old, model.version)

    @property
    def model(self) -> LoadedModel | None:
        return self._model
