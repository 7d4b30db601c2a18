"""The Open Inference Protocol (KServe v2) over REST, beside ``/api/v1``: blueprint ``oip`` at ``/v2``.

Clients written for KServe, Triton or Seldon MLServer (``tritonclient.http``, ``kserve``) talk to
the same task layer as ``/api/v1/predict``: rows are validated by :mod:`modelserve.features` and
predicted by ``services().tasks.predict`` (micro-batched over RabbitMQ), so both paths give the
same answers for the same rows.

The model, as the protocol describes it (``GET /v2/models/<name>``):

* name: the ``MODELSERVE_MODEL_NAME`` setting (default ``pima-diabetes``); versions: the release
  version the workers serve;
* one input ``input``: FP32 or FP64, shape ``[N, 8]`` (the features in
  :data:`~modelserve.features.FEATURES` order), ``data`` row-major, flat or nested, or binary;
* two outputs: ``probability`` (FP32, ``[N, 1]``) and ``label`` (INT32, ``[N, 1]``, 1 where the
  probability reaches the release's threshold).

The binary tensor data extension: a request body may be a JSON header of
``Inference-Header-Content-Length`` bytes followed by the inputs' raw little-endian bytes (an
input's ``parameters.binary_data_size`` says how many); outputs are returned the same way when
asked (``parameters.binary_data`` on a requested output, or ``binary_data_output`` on the request).
Binary inputs are range-checked and handed to the task layer as packed float32, and binary outputs
are written from the worker's packed float32 answer (:class:`~modelserve.wire.Scores`), both without
a Python object per number (:func:`_in_range`, :func:`~modelserve.wire.labels_int32`).

Errors answer ``{"error": "..."}``: 400 for a malformed request (shape, datatype, missing input,
a feature out of range), 404 for an unknown model or version, 503 when no worker answers. A
version that is not the served one is refused with 404 (on ``infer``: when the worker that
answered serves another version, e.g. mid-switch).
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from array import array
from typing import Any

from flask import Blueprint, Response, request

from modelserve import __version__
from modelserve.client import ServiceUnavailable
from modelserve.features import (
    FEATURE_RANGES,
    FEATURES,
    N_FEATURES,
    InputError,
    parse_json_body,
    validate_row,
)
from modelserve.web import _fleet_version, _json, _serving, _unavailable, services
from modelserve.wire import PackedRows, labels_int32

INPUT = "input"
OUTPUTS = {"probability": "FP32", "label": "INT32"}
PLATFORM = "tflite"
HEADER_LENGTH = "Inference-Header-Content-Length"
# Binary tensor data is little-endian; array typecodes per datatype (4- and 8-byte on every platform
# Python supports for "f", "d" and "i").
_TYPECODES = {"FP32": "f", "FP64": "d"}
# The fast range check of binary inputs assumes every feature's minimum is 0.
_LOW_IS_ZERO = all(FEATURE_RANGES[name][0] == 0 for name in FEATURES)

oip = Blueprint("oip", __name__, url_prefix="/v2")


class OIPError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _error(exc: OIPError) -> Response:
    return _json({"error": exc.message}, exc.status)


def _check_model(name: str) -> None:
    served = services().settings.model_name
    if name != served:
        raise OIPError(f"unknown model {name!r}; this server serves {served!r}", 404)


def _served_version() -> str:
    """The version the fleet serves (most workers', as /api/v1/model says); 503 when no worker
    has a loadable model."""
    s = services()
    version = _fleet_version(_serving(s.tasks.fleet(wait=s.settings.ready_timeout)))
    if not version:
        raise ServiceUnavailable("no worker has a loadable model", "worker")
    return version


def _check_version(version: str | None, served: str) -> None:
    if version is not None and version != served:
        name = services().settings.model_name
        raise OIPError(f"model {name!r} has no version {version!r}; the served version is {served!r}", 404)


# --- server ------------------------------------------------------------------------------------


@oip.get("")
def server_metadata() -> Response:
    return _json({"name": "modelserve", "version": __version__, "extensions": ["binary_tensor_data"]})


@oip.get("/health/live")
def live() -> Response:
    return _json({"live": True})


@oip.get("/health/ready")
def ready() -> Response:
    # The protocol says 200 for true and a 4xx for false.
    status, body = services().readiness.get()
    if status == 200:
        return _json({"ready": True})
    return _json({"ready": False, "error": "; ".join(body.get("reasons", ["not ready"]))}, 400)


# --- model -------------------------------------------------------------------------------------


def _metadata(name: str, version: str | None) -> dict[str, Any]:
    _check_model(name)
    served = _served_version()
    _check_version(version, served)
    return {
        "name": name,
        "versions": [served],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, N_FEATURES]}],
        "outputs": [{"name": out, "datatype": dtype, "shape": [-1, 1]} for out, dtype in OUTPUTS.items()],
    }


@oip.get("/models/<name>")
@oip.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None) -> Response:
    try:
        return _json(_metadata(name, version))
    except OIPError as exc:
        return _error(exc)
    except ServiceUnavailable as exc:
        return _unavailable(exc)


@oip.get("/models/<name>/ready")
@oip.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    try:
        _metadata(name, version)
    except OIPError as exc:
        return _error(exc)
    except ServiceUnavailable as exc:
        # Not ready is a 4xx in this protocol; the reason is in the body.
        return _json({"error": f"model not ready: {exc.reason}"}, 400)
    return _json({"name": name, "ready": True})


# --- infer -------------------------------------------------------------------------------------


def _split_body(raw: bytes) -> tuple[Any, memoryview]:
    """(JSON header, binary part) of a request body."""
    length_text = request.headers.get(HEADER_LENGTH)
    if length_text is None:
        length = len(raw)
    else:
        try:
            length = int(length_text)
        except ValueError:
            raise OIPError(f"{HEADER_LENGTH} must be an integer, got {length_text!r}") from None
        if not 0 < length <= len(raw):
            raise OIPError(f"{HEADER_LENGTH} is {length}; the body has {len(raw)} bytes")
    try:
        header = parse_json_body(raw[:length])
    except InputError as exc:
        raise OIPError(exc.message) from None
    if not isinstance(header, dict):
        raise OIPError("the inference request must be a JSON object")
    return header, memoryview(raw)[length:]


def _shape(tensor: dict[str, Any], path: str, max_rows: int) -> int:
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(d) is int for d in shape)
        or shape[1] != N_FEATURES
        or shape[0] < 1
    ):
        raise OIPError(f"{path}.shape must be [N, {N_FEATURES}] with N >= 1, got {json.dumps(shape)}")
    if shape[0] > max_rows:
        raise OIPError(f"{path}.shape has {shape[0]} rows; at most {max_rows} per request")
    return shape[0]


def _validated(rows: list, path: str) -> list[list[float]]:
    try:
        return [validate_row(row, f"{path}[{i}]") for i, row in enumerate(rows)]
    except InputError as exc:
        raise OIPError(exc.message) from None


def _rows_from_json(data: Any, n: int, path: str) -> list[list[float]]:
    if not isinstance(data, list):
        raise OIPError(f"{path} must be a list of numbers")
    if len(data) == n and all(type(row) is list for row in data):
        return _validated(data, path)  # nested [[8 numbers], ...]
    if len(data) != n * N_FEATURES:
        raise OIPError(f"{path} has {len(data)} values; shape [{n}, {N_FEATURES}] needs {n * N_FEATURES}")
    return _validated([data[i : i + N_FEATURES] for i in range(0, len(data), N_FEATURES)], path)


@functools.lru_cache(maxsize=16)
def _bounds(width: int, n: int) -> tuple[int, int]:
    """Lane patterns for :func:`_in_range`: each feature's upper bound with its sign bit set, and
    the sign bits."""
    code = {4: "<f", 8: "<d"}[width]
    signs = int.from_bytes((b"\x00" * (width - 1) + b"\x80") * N_FEATURES * n, "little")
    highs = b"".join(struct.pack(code, FEATURE_RANGES[name][1]) for name in FEATURES)
    return int.from_bytes(highs * n, "little") | signs, signs


def _in_range(raw: memoryview, width: int, n: int) -> bool:
    """Every little-endian float of ``raw`` in [0, its feature's maximum], without a Python object
    per number: a non-negative IEEE float orders like its bits read as an unsigned integer (NaN and
    infinity read larger than any finite bound), so ``raw`` is read as one big integer of lanes of
    ``width`` bytes. With no sign bit set (nothing negative), bounds-with-the-sign-bit minus values
    borrows from no neighbour, and keeps a lane's sign bit exactly where value <= bound. True is
    certain; False (also for -0.0) means "check row by row"."""
    highs, signs = _bounds(width, n)
    values = int.from_bytes(raw, "little")
    return not values & signs and (highs - values) & signs == signs


def _rows_from_binary(raw: memoryview, datatype: str, n: int, path: str) -> PackedRows:
    values = array(_TYPECODES[datatype])
    if len(raw) != n * N_FEATURES * values.itemsize:
        raise OIPError(
            f"{path} has {len(raw)} bytes; shape [{n}, {N_FEATURES}] of {datatype} needs "
            f"{n * N_FEATURES * values.itemsize}"
        )
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    if not (_LOW_IS_ZERO and _in_range(raw, values.itemsize, n)):
        # The slow path names the offending value (or accepts what the fast one cannot, e.g. -0.0).
        flat = values.tolist()
        _validated([flat[i : i + N_FEATURES] for i in range(0, len(flat), N_FEATURES)], path)
    return PackedRows(values if datatype == "FP32" else array("f", values))


def _parse_input(header: dict[str, Any], binary: memoryview, max_rows: int) -> list[list[float]] | PackedRows:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OIPError(f"'inputs' must be a list holding the one input {INPUT!r}")
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != INPUT:
        names = [t.get("name") if isinstance(t, dict) else t for t in inputs]
        raise OIPError(f"the model has one input {INPUT!r}; got {json.dumps(names)}")
    tensor, path = inputs[0], "inputs[0]"
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in _TYPECODES:
        raise OIPError(f"{path}.datatype must be FP32 or FP64, got {json.dumps(datatype)}")
    n = _shape(tensor, path, max_rows)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise OIPError(f"{path}.parameters must be an object")
    size = params.get("binary_data_size")
    if size is None:
        if len(binary):
            raise OIPError(f"the body has {len(binary)} binary bytes but no input has binary_data_size")
        if "data" not in tensor:
            raise OIPError(f"{path} has neither 'data' nor parameters.binary_data_size")
        return _rows_from_json(tensor["data"], n, f"{path}.data")
    if type(size) is not int or size != len(binary):
        raise OIPError(
            f"{path}.parameters.binary_data_size is {json.dumps(size)}; {len(binary)} bytes follow"
        )
    if "data" in tensor:
        raise OIPError(f"{path} has both 'data' and binary data")
    return _rows_from_binary(binary, datatype, n, path)


def _wanted_outputs(header: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, binary?) of each output to return, in the order asked."""
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise OIPError("'parameters' must be an object")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise OIPError("parameters.binary_data_output must be a boolean")
    asked = header.get("outputs")
    if asked is None:
        return [(name, binary_default) for name in OUTPUTS]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise OIPError("'outputs' must be a list of objects with a 'name'")
    wanted = []
    for i, out in enumerate(asked):
        if not isinstance(out.get("name"), str) or out["name"] not in OUTPUTS:
            raise OIPError(
                f"outputs[{i}]: unknown output {json.dumps(out.get('name'))}; the model has {list(OUTPUTS)}"
            )
        out_params = out.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise OIPError(f"outputs[{i}].parameters must be an object")
        binary = out_params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise OIPError(f"outputs[{i}].parameters.binary_data must be a boolean")
        wanted.append((out["name"], binary))
    return wanted


def _binary_output(result: dict[str, Any], out: str) -> bytes:
    """An output's little-endian bytes; from a packed answer's float32 scores without a Python
    object per row (wire.Scores), else from the lists."""
    if "scores" in result:
        scores = result["scores"]
        values = scores if out == "probability" else labels_int32(scores, result["threshold"])
    else:
        values = array("f", result["probabilities"]) if out == "probability" else array("i", result["labels"])
    if sys.byteorder == "big":
        values = array(values.typecode, values)  # a copy: the scores may be shared
        values.byteswap()
    return values.tobytes()


def _answer(header: dict[str, Any], name: str, result: dict[str, Any], wanted: list) -> Response:
    n = len(result["scores"]) if "scores" in result else len(result["labels"])
    outputs, chunks = [], []
    for out, binary in wanted:
        tensor: dict[str, Any] = {"name": out, "datatype": OUTPUTS[out], "shape": [n, 1]}
        if binary:
            chunks.append(_binary_output(result, out))
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            tensor["data"] = result["probabilities" if out == "probability" else "labels"]
        outputs.append(tensor)
    body: dict[str, Any] = {"model_name": name, "model_version": result["model_version"], "outputs": outputs}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    text = json.dumps(body, separators=(",", ":")).encode()
    headers = {"X-Model-Version": result["model_version"]}
    if not chunks:
        return Response(text, mimetype="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(text))
    return Response(b"".join([text, *chunks]), mimetype="application/octet-stream", headers=headers)


@oip.post("/models/<name>/infer")
@oip.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None) -> Response:
    s = services()
    try:
        _check_model(name)
        header, binary = _split_body(request.get_data(cache=False))
        rows = _parse_input(header, binary, s.settings.max_batch_rows)
        wanted = _wanted_outputs(header)
        result = s.tasks.predict(rows)
        _check_version(version, result["model_version"])
    except OIPError as exc:
        return _error(exc)
    except ServiceUnavailable as exc:
        return _unavailable(exc)
    s.metrics.predictions.labels(result["model_version"]).inc(len(rows))
    return _answer(header, name, result, wanted)
