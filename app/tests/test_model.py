import os
import sys
import time
from pathlib import Path

import modelserve.model
import ms_devstack as devstack
import pytest
from modelserve import release
from modelserve.litert import TFLiteModel
from modelserve.model import LoadedModel, ModelHolder, ModelUnavailable

ROWS = [[6, 148, 72, 35, 0, 33.6, 0.627, 50], [1, 85, 66, 29, 0, 26.6, 0.351, 31]]


def test_tflite_batches_match_single_rows(seed_release):
    model = TFLiteModel(seed_release / "model.tflite")
    batch = model.predict(ROWS * 50)
    singles = [model.predict([r])[0] for r in ROWS]
    assert len(batch) == 100
    assert batch[0] == pytest.approx(singles[0], abs=1e-6)
    assert batch[1] == pytest.approx(singles[1], abs=1e-6)
    # the seed model is a real classifier: clearly diabetic vs clearly healthy example
    assert singles[0] > 0.5 > singles[1]


def test_loaded_model_answers_version_and_labels(seed_release):
    m = LoadedModel(seed_release)
    out = m.predict(ROWS)
    assert out["model_version"] == "1.0.0"
    assert out["labels"] == [1, 0]
    assert m.info()["metrics"]["heldout_rows"] > 100


def test_holder_loads_once_and_follows_the_symlink(model_dir, seed_release):
    holder = ModelHolder(model_dir, check_interval=0.05)
    first = holder.get()
    for _ in range(50):
        assert holder.get() is first  # loaded once, not per call
    assert holder.loads == 1

    devstack.install_release(model_dir, seed_release, "1.0.1")
    release.activate(model_dir, "1.0.1")
    assert holder.get() is first  # checks the symlink at most every check_interval
    time.sleep(0.06)
    second = holder.get()
    assert second.version == "1.0.1"
    assert holder.loads == 2
    assert first.predict(ROWS)["model_version"] == "1.0.0"  # an in-flight task keeps its model


def test_holder_keeps_the_old_model_when_the_new_release_is_broken(model_dir, seed_release):
    holder = ModelHolder(model_dir, check_interval=0)
    assert holder.get().version == "1.0.0"
    devstack.install_release(model_dir, seed_release, "1.0.2")
    (model_dir / "releases" / "1.0.2" / "model.tflite").write_bytes(b"broken")
    release.activate(model_dir, "1.0.2", validate=False)
    assert holder.get().version == "1.0.0"
    release.activate(model_dir, "1.0.0")
    assert holder.get().version == "1.0.0"


def test_holder_without_release_raises(tmp_path):
    with pytest.raises(ModelUnavailable, match="no active release"):
        ModelHolder(tmp_path).get()


def test_holder_retries_a_broken_release_with_bounded_backoff(model_dir, seed_release, monkeypatch):
    tflite = model_dir / "current" / "model.tflite"
    tflite.chmod(0o644)
    tflite.write_bytes(b"\0corrupt" + tflite.read_bytes()[8:])
    attempts = []
    real = modelserve.model.LoadedModel
    monkeypatch.setattr(modelserve.model, "LoadedModel", lambda d: attempts.append(d) or real(d))
    holder = ModelHolder(model_dir, check_interval=0)
    holder.RETRY_FIRST, holder.RETRY_MAX = 0.2, 0.4
    with pytest.raises(ModelUnavailable) as err:
        holder.get()
    # The reason names the release and the file, not the host's path.
    assert "release 1.0.0 cannot be loaded" in str(err.value) and "model.tflite" in str(err.value)
    assert str(model_dir) not in str(err.value)
    for _ in range(5):  # within the backoff: not tried again
        with pytest.raises(ModelUnavailable):
            holder.get()
    assert len(attempts) == 1
    t0 = time.monotonic()
    while len(attempts) < 4 and time.monotonic() < t0 + 3:
        with pytest.raises(ModelUnavailable):
            holder.get()
        time.sleep(0.02)
    # Tried again 0.2, 0.4, 0.4 s apart (doubling, capped), polled every 20 ms meanwhile.
    assert len(attempts) == 4 and time.monotonic() - t0 >= 0.9
    tflite.write_bytes((seed_release / "model.tflite").read_bytes())  # repaired in place
    time.sleep(0.45)
    assert holder.get().version == "1.0.0" and holder.error is None


def test_worker_tasks_use_the_holder(model_dir):
    from modelserve.protocol import TASK_MODEL_INFO, TASK_PREDICT
    from modelserve.worker import create_celery_app
    from ms_support import make_settings

    app = create_celery_app(make_settings(MODELSERVE_MODEL_DIR=str(model_dir)))
    predict, model_info = app.tasks[TASK_PREDICT], app.tasks[TASK_MODEL_INFO]
    out = predict.run(ROWS)
    assert out["model_version"] == "1.0.0"
    assert out["labels"] == [1, 0]
    assert out["worker"].endswith(f":{os.getpid()}")
    assert app.modelserve_models.get() is app.modelserve_models.get()  # loaded once per process
    info = model_info.run()
    assert info["loaded"] is True and info["version"] == "1.0.0"
    with pytest.raises(ValueError, match="8-number"):
        predict.run([[1, 2]])


def test_worker_app_factory_and_command_line():
    from modelserve import worker
    from ms_support import make_settings

    settings = make_settings(MODELSERVE_TASK_QUEUE="q1", MODELSERVE_WORKER_PREFETCH="7")
    app = worker.create_celery_app(settings)
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.task_default_queue == "q1" and app.conf.worker_prefetch_multiplier == 7
    # another app's tasks stay its own (shared=False)
    assert (
        worker.create_celery_app(make_settings()).tasks["modelserve.predict"]
        is not app.tasks["modelserve.predict"]
    )
    argv = worker.celery_argv(settings, ["--extra"])
    assert argv[1:5] == ["-m", "celery", "-A", "modelserve.worker"]
    assert "--without-gossip" in argv and argv[-1] == "--extra"
    assert argv[argv.index("--queues") + 1] == "q1"


def test_celery_finds_the_worker_app_built_from_the_environment(monkeypatch):
    from celery.app.utils import find_app

    monkeypatch.setenv("MODELSERVE_TASK_QUEUE", "from-env")
    monkeypatch.delitem(sys.modules, "modelserve.worker", raising=False)
    import modelserve.worker

    assert "app" not in vars(modelserve.worker)  # importing the module configured nothing
    app = find_app("modelserve.worker")  # what `celery -A modelserve.worker` does
    assert app is modelserve.worker.app
    assert app.conf.task_default_queue == "from-env"
    assert {"modelserve.predict", "modelserve.model_info"} <= set(app.tasks)


def test_worker_and_web_do_not_import_tensorflow():
    import subprocess

    code = (
        "import sys, modelserve.worker, modelserve.web, modelserve.client;"
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    env = {**os.environ, "MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/v"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = "import sys, modelserve.web; sys.exit('ai_edge_litert' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_the_package_has_no_code_path_that_loads_model_keras():
    """Serving hosts never load model.keras: only the training module may touch Keras at all."""
    import modelserve

    package = Path(modelserve.__file__).parent
    for source in sorted(package.glob("*.py")):
        text = source.read_text(encoding="utf-8")
        assert "load_model" not in text, source.name
        if source.name != "train.py":
            assert "import keras" not in text and "import tensorflow" not in text, source.name
