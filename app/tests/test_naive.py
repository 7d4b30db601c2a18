"""The benchmark's naive baseline (tests/ms_naive.py, not in the package) answers like the served model."""

import pytest
from modelserve.model import LoadedModel
from modelserve.protocol import TASK_MODEL_INFO, TASK_PREDICT
from modelserve.wire import pack_rows, read_answer
from modelserve.worker import create_celery_app
from ms_support import make_settings

ROWS = [[6, 148, 72, 35, 0, 33.6, 0.627, 50], [1, 85, 66, 29, 0, 26.6, 0.351, 31]]


def test_naive_worker_loads_model_keras_per_task_and_agrees_with_litert(model_dir):
    import ms_naive

    app = create_celery_app(make_settings(MODELSERVE_MODEL_DIR=str(model_dir)), ms_naive.EveryTask)
    version, probs, labels = read_answer(app.tasks[TASK_PREDICT].run(pack_rows(ROWS)))
    served = LoadedModel(model_dir / "current").predict(ROWS)
    assert version == "1.0.0" and labels == served["labels"] == [1, 0]
    assert probs == pytest.approx(served["probabilities"], abs=1e-4)
    assert app.tasks[TASK_MODEL_INFO].run()["version"] == "1.0.0"
    assert app.modelserve_models.get() is not app.modelserve_models.get()  # no cache: one load per task


def test_naive_worker_without_release_is_unavailable(tmp_path):
    import ms_naive
    from modelserve.model import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="no loadable release"):
        ms_naive.EveryTask(make_settings(MODELSERVE_MODEL_DIR=str(tmp_path))).get()
