"""The benchmark's naive baseline worker: test and bench support, not part of the package.

The production Celery app and tasks (:func:`modelserve.worker.create_celery_app`) with another
model source: it loads ``model.keras`` of ``current`` again for EVERY task and predicts with Keras
(needs TensorFlow). ``bench/bench_app.py`` runs it behind the production web with micro-batching
off, so each request is one task. Serving hosts never load ``model.keras``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from modelserve import worker
from modelserve.config import Settings
from modelserve.model import ModelUnavailable, Predictor
from modelserve.release import CURRENT, ReleaseError, read_metadata


class KerasRelease(Predictor):
    """A release's ``model.keras``, loaded when this object is made."""

    def __init__(self, release_dir: Path) -> None:
        import keras

        super().__init__(release_dir, read_metadata(release_dir))
        self.keras_model = keras.models.load_model(self.release_dir / "model.keras")

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self.keras_model.predict(x, verbose=0).reshape(-1).astype(np.float32)


class EveryTask:
    """A model source without a cache: each ``get()`` (one per task) loads the release again."""

    def __init__(self, settings: Settings) -> None:
        self.current = Path(settings.model_dir) / CURRENT

    def get(self) -> KerasRelease:
        try:
            return KerasRelease(self.current.resolve(strict=True))
        except (OSError, ReleaseError) as exc:
            raise ModelUnavailable(f"no loadable release at {self.current}: {exc}") from None


# ``ms_naive.app`` for ``celery -A ms_naive``, built from the environment on first use.
__getattr__ = worker.app_on_first_use(__name__, EveryTask)


def main(argv: list[str] | None = None) -> int:
    """Like ``modelserve-worker``, with this module's app."""
    return worker.main(argv, app=__name__)
