import hashlib
import json
import sys

import numpy as np
import pytest
from modelserve_edge import rul_model, simulator
from modelserve_edge.rul_classifier import RulClassifier
from modelserve_edge.rul_model import LiteRtRulModel, NumpyRulModel, default_model_dir, features, load_model

pytest.importorskip("ai_edge_litert", reason="LiteRT parity needs ai-edge-litert (not on 32-bit ARM)")


def rows(seed, engines):
    x, y = [], []
    for e in range(1, engines + 1):
        t = simulator.trajectory(seed, e, 1)
        x += [features(simulator.reading(t, i)) for i in range(t.life)]
        y += list(t.rul)
    return np.array(x), np.array(y, dtype=float)


@pytest.fixture(scope="module")
def models():
    return LiteRtRulModel(default_model_dir()), NumpyRulModel(default_model_dir())


def test_committed_model_files_match_metadata():
    d = default_model_dir()
    meta = json.loads((d / "metadata.json").read_text())
    for name, digest in meta["files"].items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest
    assert meta["features"] == rul_model.FEATURES


def test_litert_and_numpy_give_the_same_predictions(models):
    lite, numpy_model = models
    x, _ = rows(99, 3)
    batch = lite.predict(x)
    assert np.allclose(batch, numpy_model.predict(x), atol=1e-3, rtol=1e-5)
    # single-row inference (what the module does) agrees with the batch
    single = np.array([lite.predict(r)[0] for r in x[::25]])
    assert np.allclose(single, batch[::25], atol=1e-3)
    # and the raw network outputs, before clipping
    z = lite.standardize(x)
    assert np.allclose(lite.raw(z), numpy_model.raw(z), atol=1e-3, rtol=1e-5)


def test_model_predicts_rul_on_unseen_engines(models):
    _, model = models
    x, y = rows(4242, 6)
    pred = model.predict(x)
    assert pred.min() >= 0 and pred.max() <= model.rul_cap
    rmse = float(np.sqrt(np.mean((pred - np.minimum(y, model.rul_cap)) ** 2)))
    assert rmse < 25, rmse
    t = simulator.trajectory(4242, 1, 1)
    p = model.predict(np.array([features(simulator.reading(t, i)) for i in range(t.life)]))
    assert p[-10:].mean() < 25 and p[:10].mean() > 90


def test_auto_backend_falls_back_to_numpy_without_litert(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    assert isinstance(load_model(None, "auto"), NumpyRulModel)
    with pytest.raises(ValueError, match="backend"):
        load_model(None, "onnx")


def test_classifier_adds_rul_and_keeps_the_reading(models):
    lite, _ = models
    sent = []
    clf = RulClassifier(lite, lambda o, b: sent.append((o, json.loads(b))))
    reading = simulator.reading(simulator.trajectory(1, 1, 1), 0)
    clf.handle("amlInput", json.dumps(reading).encode())
    clf.handle("amlInput", json.dumps({**reading, "sensors": [1.0] * 3}).encode())  # malformed: dropped
    clf.handle("amlInput", b"{")
    clf.handle("amlInput", b"[1, 2]")  # JSON, but not an object: dropped
    assert len(sent) == 1
    output, msg = sent[0]
    assert output == "amlOutput"
    assert {k: msg[k] for k in reading} == reading
    assert msg["RUL"] == pytest.approx(lite.predict(features(reading))[0], abs=1e-3)
    assert msg["modelVersion"] == lite.version


def test_features_reject_malformed_readings():
    good = simulator.reading(simulator.trajectory(1, 1, 1), 0)
    assert features(good).shape == (rul_model.N_FEATURES,)
    for bad in (
        {},
        {**good, "cycle": "x"},
        {**good, "settings": [1, 2]},
        {**good, "sensors": [float("nan")] * 21},
    ):
        with pytest.raises(ValueError):
            features(bad)
