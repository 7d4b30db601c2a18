"""Serving-side model: a release answering predict tasks, and hot switching between releases.

numpy + LiteRT only. Depends on :mod:`modelserve.release` (never the other way round).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelserve import wire
from modelserve.drift import Profile
from modelserve.features import N_FEATURES
from modelserve.litert import TFLiteModel
from modelserve.release import CURRENT, read_metadata, validate_release

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No release is active, or the active one cannot be loaded."""


# Told every predicted batch: its rows (n, 8) float32 and their probabilities (n,) (drift).
Observer = Callable[[np.ndarray, np.ndarray], None]


class Predictor:
    """Answers the predict tasks for one release; a subclass says how it computes probabilities."""

    drift_profile: Profile | None = None  # the release's reference profile, if it has one

    def __init__(self, release_dir: Path, metadata: dict[str, Any]) -> None:
        self.release_dir = Path(release_dir)
        self.metadata = metadata
        self.version: str = metadata["version"]
        self.threshold = float(metadata.get("threshold", wire.DEFAULT_THRESHOLD))
        self.loaded_at = datetime.now(UTC).isoformat(timespec="seconds")

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """float32 probabilities of an (n, 8) float32 matrix."""
        raise NotImplementedError

    def _scored(self, x: np.ndarray, observe: Observer | None) -> np.ndarray:
        probabilities = self.probabilities(x)
        if observe is not None:
            observe(x, np.asarray(probabilities, dtype=np.float32).reshape(-1))
        return probabilities

    def predict(self, rows: Any, observe: Observer | None = None) -> dict[str, Any]:
        """Rows as 8-number lists in, probabilities and labels as JSON lists out."""
        x = np.asarray(rows, dtype=np.float32).reshape(-1, N_FEATURES)
        return wire.list_answer(self.version, self.threshold, self._scored(x, observe))

    def predict_packed(self, rows_b64: str, observe: Observer | None = None) -> dict[str, Any]:
        """Rows as base64 float32 in (what the web sends), probabilities the same way out."""
        x = np.frombuffer(wire.unpack_rows(rows_b64), dtype=np.float32).reshape(-1, N_FEATURES)
        if not np.isfinite(x).all():
            raise ValueError("packed rows contain NaN or infinity")
        return wire.packed_answer(self.version, self.threshold, self._scored(x, observe))

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


class LoadedModel(Predictor):
    """A release's model.tflite, validated and loaded once."""

    def __init__(self, release_dir: Path, *, validate: bool = True) -> None:
        meta = validate_release(release_dir, load=False) if validate else read_metadata(release_dir)
        super().__init__(release_dir, meta)
        self.model = TFLiteModel(self.release_dir / "model.tflite")
        self.drift_profile = Profile.load(self.release_dir)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)


class LoadObserver(Protocol):
    """What a :class:`ModelHolder` reports its loads to (the worker's metrics)."""

    def model_loaded(self, version: str, seconds: float, previous: str | None) -> None: ...

    def model_load_failed(self, version: str) -> None: ...


def trained_timestamp(model: Predictor) -> float | None:
    """When the release was trained (metadata ``trained_at``), as a Unix time; None if unknown."""
    try:
        return datetime.fromisoformat(str(model.metadata["trained_at"])).timestamp()
    except (KeyError, ValueError):
        return None


class ModelHolder:
    """Holds the model of ``<model_dir>/current`` and follows the symlink when it moves.

    ``get()`` is called once per task. It re-reads the symlink (one readlink) at most every
    ``check_interval`` seconds; when the target changed it loads the new release before
    swapping, so a task always gets a complete model and a bad release never replaces a good one.
    A target that failed to load is tried again with a bounded exponential backoff (a file being
    repaired in place is picked up without a restart); ``error`` says why the last load failed,
    without the model directory's path (it travels in the worker's status to the front ends).
    """

    RETRY_FIRST = 0.5
    RETRY_MAX = 30.0

    def __init__(
        self, model_dir: Path, check_interval: float = 0.5, observer: LoadObserver | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.check_interval = check_interval
        self.observer = observer
        self._model: LoadedModel | None = None
        self._target: str | None = None
        self._failed_target: str | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._next_check = 0.0
        self._lock = threading.Lock()
        self.loads = 0
        self.error: str | None = None

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
            raise ModelUnavailable(self.error or "no loadable release")
        return self._model

    def _refresh(self) -> None:
        target = self._readlink()
        if target is None:
            if self._model is None:
                self.error = f"no active release ({CURRENT} is missing)"
            return
        if target == self._target:
            return
        now = time.monotonic()
        if target == self._failed_target and now < self._retry_at:
            return
        started = time.perf_counter()
        try:
            model = LoadedModel(self.model_dir / target)
        except Exception as exc:
            if self.observer is not None:
                self.observer.model_load_failed(Path(target).name)
            first = target != self._failed_target
            self._backoff = self.RETRY_FIRST if first else min(self._backoff * 2, self.RETRY_MAX)
            self._failed_target, self._retry_at = target, now + self._backoff
            self.error = f"release {Path(target).name} cannot be loaded: " + self._without_paths(exc)
            log.error(
                "cannot load release %s (keeping %s, next try in %.1f s): %s",
                target, self._target, self._backoff, exc,
            )  # fmt: skip
            return
        old = self._model.version if self._model else None
        self._model, self._target, self._failed_target, self.error = model, target, None, None
        self.loads += 1
        if self.observer is not None:
            self.observer.model_loaded(model.version, time.perf_counter() - started, old)
        log.warning("model release switched: %s -> %s", old, model.version)

    def _without_paths(self, exc: Exception) -> str:
        text = str(exc).replace(str(self.model_dir.resolve()), "").replace(str(self.model_dir), "")
        return " ".join(text.split())[:300] or type(exc).__name__

    @property
    def model(self) -> LoadedModel | None:
        return self._model
