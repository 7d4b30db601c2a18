"""Drift without labels: a release's reference profile, and live rows compared with it.

**The profile** (``drift_profile.json`` in a release, written by ``modelserve-train`` from the
training split): for each feature and for the model's score (its probability, column ``score``),

* ``edges``: the inner edges of up to :data:`BINS` quantile bins of the training values (equal
  quantiles merge, so a feature with many equal values, e.g. insulin's zeros, has fewer bins); bin
  *i* holds the values ``edges[i-1] < v <= edges[i]``, the first and last bins are open;
* ``proportions``: the share of the training values in each bin (the expected proportions of PSI);
* ``values``/``cdf``: the reference's empirical distribution function, ``P(X <= values[j]) =
  cdf[j]``, at every distinct training value, or at :data:`KS_POINTS` quantiles when there are more
  (then the two-sample KS statistic is exact to within ``1 / KS_POINTS``).

**Live**: every row a worker predicts, and its score, go into a :class:`DriftWindow`, the last
``MODELSERVE_DRIFT_WINDOW`` rows of the served version. Per column, over the window:

* the population stability index, ``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)`` over the profile's
  bins, ``e`` expected and ``a`` actual proportions (an empty live bin counts as half a row, so PSI
  stays finite); the usual bands are < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant;
* the two-sample Kolmogorov-Smirnov statistic ``D = sup_x |F_reference(x) - F_window(x)|``.

Where the window lives: in the worker, which has the release (and so its profile) on disk, sees
every row whichever front end or protocol (``/api/v1``, ``/v2``) it came through, and knows which
version scored it. One window per worker instance in shared memory (an anonymous ``MAP_SHARED``
mapping and a semaphore made before the prefork pool forks): its pool processes all write to it and
the main process, which serves ``/metrics``, computes the statistics at scrape time from all of
them. So the gauges are one coherent window per worker instance, not one per pool process combined
afterwards (a ``max`` over per-process windows of a share of the rows each would overstate drift),
and nothing is stored in prometheus_client's files. The web tier would see every row too, but one
window per gunicorn process per front end, without the profile or numpy.

numpy only, imported when needed: :mod:`modelserve.release` checks profiles without it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import multiprocessing
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelserve.features import FEATURES, N_FEATURES

if TYPE_CHECKING:
    import numpy as np

PROFILE = "drift_profile.json"
SCORE = "score"
COLUMNS: tuple[str, ...] = (*FEATURES, SCORE)
BINS = 10
KS_POINTS = 256
FORMAT = 1
# An empty live bin counts as this many rows (PSI's logarithm needs a non-zero share).
EMPTY_BIN_ROWS = 0.5


class ProfileError(ValueError):
    """A drift profile is malformed."""


# --- the profile ---------------------------------------------------------------------------------


def build_profile(x: np.ndarray, scores: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """The reference profile of training rows ``x`` (n, 8) and the model's scores on them (n,)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64).reshape(-1, N_FEATURES)
    columns = np.column_stack([x, np.asarray(scores, dtype=np.float64).reshape(-1)])
    out: dict[str, Any] = {}
    for name, values in zip(COLUMNS, columns.T, strict=True):
        # float32 first: live rows arrive as float32, and an edge must bin them as it bins these.
        values = np.sort(values.astype(np.float32).astype(np.float64))
        edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf"))
        counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
        distinct, last = np.unique(values, return_index=True)
        cdf = (np.append(last[1:], len(values))) / len(values)  # P(X <= each distinct value)
        if len(distinct) > KS_POINTS:
            keep = np.unique(np.searchsorted(cdf, np.linspace(0, 1, KS_POINTS + 1)[1:], side="left"))
            distinct, cdf = distinct[keep], cdf[keep]
        out[name] = {
            "edges": [float(e) for e in edges],
            "proportions": [round(float(c) / len(values), 6) for c in counts],
            "values": [float(v) for v in distinct],
            "cdf": [round(float(c), 6) for c in cdf],
        }
    return {"format": FORMAT, "rows": len(x), "bins": bins, "columns": out}


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )


def check_profile(data: Any) -> list[str]:
    """What is wrong with a profile (pure Python; empty when it is usable)."""
    if not isinstance(data, dict):
        return ["must be a JSON object"]
    problems = []
    if data.get("format") != FORMAT:
        problems.append(f"format must be {FORMAT}, got {data.get('format')!r}")
    rows = data.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        problems.append(f"rows must be a positive integer, got {rows!r}")
    columns = data.get("columns")
    if not isinstance(columns, dict) or list(columns) != list(COLUMNS):
        got = list(columns) if isinstance(columns, dict) else columns
        return [*problems, f"columns must be {list(COLUMNS)} in this order, got {got!r}"]
    for name, col in columns.items():
        where = f"columns.{name}"
        if not isinstance(col, dict):
            problems.append(f"{where} must be an object")
            continue
        edges, props, values, cdf = (col.get(k) for k in ("edges", "proportions", "values", "cdf"))
        if not _numbers(edges) or any(a >= b for a, b in itertools.pairwise(edges)):
            problems.append(f"{where}.edges must be strictly increasing finite numbers")
        elif not _numbers(props) or len(props) != len(edges) + 1:
            problems.append(f"{where}.proportions must be {len(edges) + 1} numbers (one per bin)")
        elif any(not 0 <= p <= 1 for p in props) or abs(sum(props) - 1) > 1e-4:
            problems.append(f"{where}.proportions must be in [0, 1] and sum to 1, got sum {sum(props):g}")
        if not _numbers(values) or not values or any(a >= b for a, b in itertools.pairwise(values)):
            problems.append(f"{where}.values must be strictly increasing finite numbers, at least one")
        elif not _numbers(cdf) or len(cdf) != len(values):
            problems.append(f"{where}.cdf must be {len(values)} numbers (one per value)")
        elif any(a > b for a, b in itertools.pairwise(cdf)) or cdf[0] <= 0 or abs(cdf[-1] - 1) > 1e-4:
            problems.append(f"{where}.cdf must be non-decreasing in (0, 1] and end at 1")
    return problems


def read_profile(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{Path(path).name}: unreadable or not JSON: {exc}") from None
    problems = check_profile(data)
    if problems:
        raise ProfileError(f"{Path(path).name}: " + "; ".join(problems))
    return data


class Profile:
    """A checked profile as numpy arrays, ready to compare windows with."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        import numpy as np

        self.rows = int(data["rows"])
        cols = [data["columns"][name] for name in COLUMNS]
        self.edges = [np.asarray(c["edges"], dtype=np.float64) for c in cols]
        self.expected = [np.maximum(np.asarray(c["proportions"], dtype=np.float64), 1e-6) for c in cols]
        self.values = [np.asarray(c["values"], dtype=np.float64) for c in cols]
        self.cdf = [np.asarray(c["cdf"], dtype=np.float64) for c in cols]

    @classmethod
    def load(cls, release_dir: Path) -> Profile | None:
        """The release's profile; None when it has none (drift is then off for it)."""
        path = Path(release_dir) / PROFILE
        return cls(read_profile(path)) if path.is_file() else None

    def compare(self, window: np.ndarray) -> dict[str, tuple[float, float]]:
        """(PSI, KS statistic) per column of a window of rows (m, 9): 8 features, then the score."""
        import numpy as np

        m = len(window)
        out = {}
        for i, name in enumerate(COLUMNS):
            live = np.sort(window[:, i].astype(np.float64))
            bins = np.searchsorted(self.edges[i], live, side="left")
            counts = np.bincount(bins, minlength=len(self.expected[i]))
            actual = np.maximum(counts, EMPTY_BIN_ROWS) / m
            expected = self.expected[i]
            psi = float(np.sum((actual - expected) * np.log(actual / expected)))
            # sup |F_ref - F_live| is reached at a point of one of the two samples.
            points = np.concatenate([self.values[i], live])
            ref_at = np.searchsorted(self.values[i], points, side="right") - 1
            f_ref = np.where(ref_at >= 0, self.cdf[i][np.maximum(ref_at, 0)], 0.0)
            f_live = np.searchsorted(live, points, side="right") / m
            out[name] = (round(psi, 6), round(float(np.max(np.abs(f_ref - f_live))), 6))
        return out


# --- the live window -----------------------------------------------------------------------------

_HEADER = 64  # int64 rows since the version started, int64 rows ever, then the version's digest


def _digest(version: str) -> bytes:
    return hashlib.sha256(version.encode()).digest()[:32]


class DriftWindow:
    """The last ``size`` rows (and scores) one version predicted, shared by a worker's processes.

    Made in the worker's main process before the prefork pool forks: the mapping (anonymous,
    ``MAP_SHARED``) and the lock are inherited by every pool process. ``size`` 0 keeps only the row
    count (the throughput in the worker's status).
    """

    def __init__(self, size: int) -> None:
        import numpy as np

        self.size = size
        self._map = mmap.mmap(-1, _HEADER + max(1, size) * (N_FEATURES + 1) * 4)
        self._counts = np.frombuffer(self._map, dtype=np.int64, count=2)
        self._rows = np.frombuffer(self._map, dtype=np.float32, offset=_HEADER).reshape(-1, N_FEATURES + 1)
        self._lock = multiprocessing.get_context("fork").Lock()

    def add(self, version: str, x: np.ndarray, scores: np.ndarray) -> None:
        """Rows (n, 8) float32 and their scores (n,) predicted by ``version``."""
        import numpy as np

        n = len(x)
        digest = _digest(version)
        with self._lock:
            if self._map[16:48] != digest:  # a new version: its window starts empty
                self._map[16:48] = digest
                self._counts[0] = 0
            start = int(self._counts[0])
            self._counts[0] += n
            self._counts[1] += n
            if not self.size:
                return
            if n > self.size:
                x, scores, start = x[-self.size :], scores[-self.size :], start + n - self.size
            at = (start + np.arange(len(x))) % self.size
            self._rows[at, :N_FEATURES] = x
            self._rows[at, N_FEATURES] = scores

    def count(self, n: int) -> None:
        with self._lock:
            self._counts[1] += n

    @property
    def rows_total(self) -> int:
        """Rows predicted by this worker since it started (every version)."""
        return int(self._counts[1])

    def snapshot(self, version: str) -> np.ndarray | None:
        """A copy of the window's rows if they are ``version``'s, else None."""
        with self._lock:
            if self._map[16:48] != _digest(version):
                return None
            return self._rows[: min(int(self._counts[0]), self.size)].copy()


class DriftMonitor:
    """A worker's drift: its window, and the statistics of the version it serves (cached per state)."""

    def __init__(self, window: int, min_rows: int) -> None:
        self.window = DriftWindow(window)
        self.min_rows = min_rows
        self._cache: tuple[tuple, dict[str, Any]] | None = None
        self._rates: list[tuple[float, int]] = []

    @property
    def enabled(self) -> bool:
        return self.window.size > 0

    def observe(self, version: str, x: np.ndarray, scores: np.ndarray) -> None:
        if self.enabled:
            self.window.add(version, x, scores)
        else:
            self.window.count(len(x))

    def summary(self, version: str | None, profile: Profile | None) -> dict[str, Any]:
        """What the worker's metrics and status say about drift of ``version``:

        ``enabled`` (and ``reason`` when not), ``rows`` in the window, ``min_rows``, and when
        ``rows >= min_rows`` ``columns``: {column: {"psi": ..., "ks": ...}}.
        """
        if not self.enabled:
            return {"enabled": False, "reason": "drift window is 0 (MODELSERVE_DRIFT_WINDOW)"}
        if version is None:
            return {"enabled": False, "reason": "no model"}
        if profile is None:
            return {"enabled": False, "reason": f"release {version} has no {PROFILE}"}
        key = (version, id(profile), self.window.rows_total)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        rows = self.window.snapshot(version)
        n = 0 if rows is None else len(rows)
        out: dict[str, Any] = {"enabled": True, "rows": n, "window": self.window.size}
        out["min_rows"] = self.min_rows
        if rows is not None and n >= self.min_rows:
            out["columns"] = {k: {"psi": p, "ks": d} for k, (p, d) in profile.compare(rows).items()}
        self._cache = (key, out)
        return out

    def rows_per_second(self, span: float = 30.0) -> float | None:
        """Rows per second over about the last ``span`` seconds (None until two calls apart)."""
        now, total = time.monotonic(), self.window.rows_total
        self._rates = [(t, c) for t, c in self._rates if now - t <= span] + [(now, total)]
        (t0, c0) = self._rates[0]
        return None if now - t0 < 0.5 else round((total - c0) / (now - t0), 2)
