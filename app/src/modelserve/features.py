"""The model's input contract and the validation of prediction requests (pure Python, no numpy).

Every rejection is an :class:`InputError` carrying the HTTP status and the JSON path of the
offending field, e.g. ``rows[3].glucose``; the web tier turns it into a 4xx JSON answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

# Order matters: it is the column order of the training CSV and of the model's input tensor.
FEATURES: tuple[str, ...] = (
    "pregnancies",
    "glucose",
    "blood_pressure",
    "skin_thickness",
    "insulin",
    "bmi",
    "diabetes_pedigree",
    "age",
)
N_FEATURES = len(FEATURES)

# Physically possible ranges (inclusive). Zero is allowed everywhere: the data set uses 0 for
# "not measured" in glucose, blood pressure, skin thickness, insulin and BMI.
FEATURE_RANGES: dict[str, tuple[float, float]] = {
    "pregnancies": (0, 30),
    "glucose": (0, 1000),
    "blood_pressure": (0, 400),
    "skin_thickness": (0, 200),
    "insulin": (0, 5000),
    "bmi": (0, 200),
    "diabetes_pedigree": (0, 10),
    "age": (0, 150),
}

ROW_KEYS = ("rows", "row", "instances")


@dataclass
class InputError(Exception):
    message: str
    field: str | None = None
    status: int = 422

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


def _constant(name: str) -> float:
    # json.loads accepts NaN/Infinity tokens; keep them as floats so the row validator can name
    # the field that carried them.
    return float(name.replace("Infinity", "inf"))


def parse_json_body(raw: bytes) -> Any:
    if not raw or not raw.strip():
        raise InputError("request body is empty; expected a JSON object", None, 400)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("request body is not UTF-8 JSON", None, 400) from None
    try:
        return json.loads(text, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"request body is not valid JSON: {exc}", None, 400) from None


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{field} must be a number, got {type(value).__name__}", field)
    try:
        number = float(value)
    except OverflowError:
        raise InputError(f"{field} is out of range", field) from None
    if math.isnan(number) or math.isinf(number):
        raise InputError(f"{field} must be a finite number", field)
    return number


_BOUNDS = tuple(FEATURE_RANGES[name] for name in FEATURES)
_NUMBER_TYPES = (int, float)


def _fast_row(values: list) -> list[float] | None:
    """The common case, quickly: 8 plain in-range numbers. None means "check slowly, name the field"."""
    if len(values) != N_FEATURES:
        return None
    out = []
    for value, (low, high) in zip(values, _BOUNDS, strict=True):
        if type(value) not in _NUMBER_TYPES:  # excludes bool, a subclass of int
            return None
        try:
            number = float(value)
        except OverflowError:
            return None
        if not low <= number <= high:  # also false for NaN
            return None
        out.append(number)
    return out


def validate_row(row: Any, path: str) -> list[float]:
    """One row: a list of 8 numbers in FEATURES order, or an object with exactly the 8 names."""
    if type(row) is list:
        fast = _fast_row(row)
        if fast is not None:
            return fast
    elif type(row) is dict and len(row) == N_FEATURES:
        try:
            fast = _fast_row([row[name] for name in FEATURES])
        except KeyError:
            fast = None
        if fast is not None:
            return fast
    if isinstance(row, dict):
        for key in row:
            if key not in FEATURE_RANGES:
                raise InputError(f"unknown field {key!r}; expected {', '.join(FEATURES)}", f"{path}.{key}")
        values = []
        for name in FEATURES:
            if name not in row:
                raise InputError(f"missing field {name!r}", f"{path}.{name}")
            values.append((name, row[name], f"{path}.{name}"))
    elif isinstance(row, list):
        if len(row) != N_FEATURES:
            raise InputError(
                f"{path} must have {N_FEATURES} features ({', '.join(FEATURES)}), got {len(row)}", path
            )
        values = [(name, row[i], f"{path}[{i}]") for i, name in enumerate(FEATURES)]
    else:
        raise InputError(
            f"{path} must be a list of {N_FEATURES} numbers or an object with the named features", path
        )
    out = []
    for name, value, field in values:
        number = _number(value, field)
        low, high = FEATURE_RANGES[name]
        if number < low:
            raise InputError(f"{field} ({name}) must be >= {low:g}, got {number:g}", field)
        if number > high:
            raise InputError(f"{field} ({name}) must be <= {high:g}, got {number:g}", field)
        out.append(number)
    return out


def validate_request(body: Any, max_rows: int) -> tuple[list[list[float]], bool]:
    """Validate a predict body. Returns (rows, single) where single means the ``row`` form."""
    if not isinstance(body, dict):
        raise InputError("request body must be a JSON object with 'rows', 'row' or 'instances'", None, 400)
    present = [key for key in ROW_KEYS if key in body]
    for key in body:
        if key not in ROW_KEYS:
            raise InputError(f"unknown field {key!r}; expected one of {', '.join(ROW_KEYS)}", key)
    if len(present) != 1:
        raise InputError("exactly one of 'rows', 'row' or 'instances' is required", "rows")
    key = present[0]
    if key == "row":
        return [validate_row(body["row"], "row")], True
    rows = body[key]
    if not isinstance(rows, list):
        raise InputError(f"{key} must be a list of rows", key)
    if not rows:
        raise InputError(f"{key} is empty; send at least one row", key)
    if len(rows) > max_rows:
        raise InputError(f"{key} has {len(rows)} rows; at most {max_rows} per request", key, 413)
    return [validate_row(row, f"{key}[{i}]") for i, row in enumerate(rows)], False
