import json
import re
import tomllib
from importlib import import_module

import numpy as np
import pytest
from conftest import SRC
from modelserve_edge.routes import load_routes

EDGE = SRC.parent
MODULES = ["simulator", "router", "rul_classifier", "avro_writer"]
ARCHS = ["amd64", "arm64v8", "arm32v7"]


def test_console_scripts_point_at_main_functions():
    scripts = tomllib.loads((EDGE / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {
        "modelserve-edge-simulator",
        "modelserve-edge-router",
        "modelserve-edge-rul-classifier",
        "modelserve-edge-avro-writer",
        "modelserve-edge-upstream",
        "modelserve-edge-train",
    }
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(import_module(module), func)), target


@pytest.mark.parametrize("module", MODULES)
def test_module_metadata_and_dockerfiles(module):
    d = EDGE / "modules" / module
    meta = json.loads((d / "module.json").read_text())
    assert (d / meta["image"]["contextPath"]).resolve() == EDGE
    assert set(meta["image"]["tag"]["platforms"]) == set(ARCHS)
    script = "modelserve-edge-" + module.replace("_", "-")
    for arch, dockerfile in meta["image"]["tag"]["platforms"].items():
        text = (d / dockerfile).read_text()
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert base.startswith("python:" if arch == "amd64" else f"{arch}/python:"), (arch, base)
        assert f'CMD ["{script}"]' in text
        assert "USER edge" in text
        litert = "litert" in re.search(r'pip install "\.\[([^\]]*)\]"', text).group(1)
        assert litert == (module == "rul_classifier" and arch != "arm32v7")  # no LiteRT wheel on 32-bit ARM


def test_deployment_template_modules_and_routes():
    manifest = json.loads((EDGE / "deployment.template.json").read_text())
    modules = manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    assert set(modules) == {"router", "rul_classifier", "avro_writer"}  # the simulator is a leaf device
    for name, spec in modules.items():
        assert spec["settings"]["image"] == "${MODULES." + name + "}"
    routes = load_routes(EDGE / "deployment.template.json")
    sinks = {(r.sink_module, r.sink_input) for r in routes.routes}
    assert sinks == {
        ("router", "deviceInput"),
        ("rul_classifier", "amlInput"),
        ("router", "rulInput"),
        ("$upstream", "messages"),
        ("avro_writer", "avroModuleInput"),
    }
    assert routes.outputs_of("router") == {"classify", "toIotHub", "writeAvro"}
    assert routes.outputs_of("rul_classifier") == {"amlOutput"}


def test_readme_documents_every_environment_variable():
    readme = (EDGE / "README.md").read_text()
    used = set()
    for path in SRC.rglob("*.py"):
        used |= set(re.findall(r'env_(?:str|int|float|bool)\(\s*"([A-Z0-9_]+)"', path.read_text()))
    assert used, "no variables found"
    missing = sorted(v for v in used if f"`{v}`" not in readme)
    assert not missing, f"undocumented: {missing}"


def test_training_command_exports_a_consistent_model(tmp_path):
    pytest.importorskip("tensorflow", reason="training needs tensorflow-cpu")
    from modelserve_edge.rul_model import LiteRtRulModel, NumpyRulModel
    from modelserve_edge.train import main

    assert main(["--out", str(tmp_path), "--engines", "4", "--validation-engines", "1", "--epochs", "2"]) == 0
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["activations"] == ["relu", "relu", "linear"] and meta["training"]["epochs"] == 2
    numpy_model = NumpyRulModel(tmp_path)
    x = np.random.default_rng(0).normal(size=(16, 25)) * numpy_model.std + numpy_model.mean
    assert np.allclose(LiteRtRulModel(tmp_path).predict(x), numpy_model.predict(x), atol=1e-3)
    assert meta["metrics"]["max_abs_diff_litert_numpy"] < 1e-3
