"""``modelserve-edge-rul-classifier``: remaining useful life for each reading.

Input ``amlInput``: a sensor reading. Output ``amlOutput``: the same message plus ``RUL`` (cycles)
and ``modelVersion``. Malformed readings are logged and dropped.
"""

from __future__ import annotations

import logging
import sys

from modelserve_edge.config import env_str
from modelserve_edge.rul_model import RulModel, features, load_model
from modelserve_edge.transport import Transport, encode, handle_object

log = logging.getLogger(__name__)

INPUT = "amlInput"
OUTPUT = "amlOutput"


class RulClassifier:
    def __init__(self, model: RulModel, send):
        self.model = model
        self.send = send  # send(output, body: bytes)

    def score(self, message: dict) -> dict:
        rul = float(self.model.predict(features(message))[0])
        return {**message, "RUL": round(rul, 4), "modelVersion": self.model.version}

    def handle(self, input_name: str, body: bytes) -> None:
        result = handle_object(input_name, INPUT, body, self.score, log, "a malformed reading")
        if result is None:
            return
        self.send(OUTPUT, encode(result))


def main() -> int:
    from modelserve_edge.runtime import serve

    def build(transport: Transport):
        model = load_model(env_str("RUL_MODEL_DIR", None), env_str("RUL_BACKEND", "auto"))
        log.info("model %s (%s backend) from %s", model.version, model.backend, model.model_dir)
        return RulClassifier(model, transport.send).handle, None

    return serve("rul_classifier", build)


if __name__ == "__main__":
    sys.exit(main())
