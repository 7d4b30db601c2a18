import os
import time

import pytest
from modelserve import devstack, release
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
    with pytest.raises(ModelUnavailable):
        ModelHolder(tmp_path).get()


def test_worker_task_uses_the_holder(model_dir, monkeypatch):
    from modelserve import worker

    monkeypatch.setattr(worker, "_holder", ModelHolder(model_dir))
    monkeypatch.setattr(worker, "_holder_pid", os.getpid())
    out = worker.predict.run(ROWS)
    assert out["model_version"] == "1.0.0"
    assert out["labels"] == [1, 0]
    assert out["worker"].endswith(f":{os.getpid()}")
    info = worker.model_info.run()
    assert info["loaded"] is True and info["version"] == "1.0.0"
    with pytest.raises(ValueError, match="8-number"):
        worker.predict.run([[1, 2]])


def test_worker_command_line():
    from modelserve import worker

    argv = worker.celery_argv(["--extra"])
    assert argv[1:5] == ["-m", "celery", "-A", "modelserve.worker"]
    assert "--without-gossip" in argv and argv[-1] == "--extra"
    assert worker.app.conf.task_acks_late is True
    assert worker.app.conf.task_reject_on_worker_lost is True


def test_worker_and_web_do_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, modelserve.worker, modelserve.web, modelserve.client;"
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    env = {**os.environ, "MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/v"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = "import sys, modelserve.web; sys.exit('ai_edge_litert' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
