"""Measure a release on labelled rows: accuracy and AUC of its ``model.tflite`` (LiteRT only).

Production's release gate runs this on its own evaluation data, in a sandbox, for the pushed release
and the served one; the numbers in a release's ``metadata.json`` are never trusted. Only the
LiteRT model is loaded, never ``model.keras``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import numpy as np

from modelserve.features import N_FEATURES
from modelserve.release import validate_release
from modelserve.wire import DEFAULT_THRESHOLD


def load_csv(path: Path | TextIO) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 8 features then a 0/1 label, no header (from a path or an open text stream)."""
    path_name = getattr(path, "name", path)
    data = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if data.shape[1] != N_FEATURES + 1:
        raise ValueError(f"{path_name}: expected {N_FEATURES + 1} columns, got {data.shape[1]}")
    y = data[:, -1]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{path_name}: the last column must be a 0/1 label")
    return data[:, :N_FEATURES].astype(np.float32), y.astype(np.float32)


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes in the held-out set")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def measure(release_dir: Path, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Accuracy (at the release's threshold) and AUC of a valid release's model.tflite on (x, y)."""
    from modelserve.litert import TFLiteModel

    meta = validate_release(release_dir, load=False)  # checksums: the measured file is the listed one
    threshold = float(meta.get("threshold", DEFAULT_THRESHOLD))
    try:
        probs = np.asarray(TFLiteModel(Path(release_dir) / "model.tflite").predict(x), dtype=np.float64)
    except Exception as exc:  # whatever a broken or hostile file makes LiteRT raise
        raise ValueError(f"model.tflite does not load or run: {exc}") from None
    if probs.shape != y.shape or not np.isfinite(probs).all():
        raise ValueError(f"model.tflite gave {probs.shape} non-finite or misshaped scores for {len(y)} rows")
    return {
        "accuracy": round(float(((probs >= threshold) == y.astype(bool)).mean()), 4),
        "auc": round(roc_auc(y, probs), 4),
        "rows": len(y),
    }
