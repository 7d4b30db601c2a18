"""``modelserve-edge-router``: leaf-device readings to the classifier, its answers onward.

* ``deviceInput`` (leaf devices) -> ``classify``
* ``rulInput`` (classifier) -> ``writeAvro`` (the whole message) and ``toIotHub`` (``{deviceId, RUL}``,
  only when ``RUL < RUL_ALERT_THRESHOLD`` if that is set)
"""

from __future__ import annotations

import logging
import sys

from modelserve_edge.config import env_float
from modelserve_edge.transport import Transport, decode, encode

log = logging.getLogger(__name__)

DEVICE_INPUT = "deviceInput"
RUL_INPUT = "rulInput"
CLASSIFY = "classify"
UPSTREAM = "toIotHub"
AVRO = "writeAvro"


class Router:
    def __init__(self, send, alert_threshold: float | None = None):
        self.send = send  # send(output, body: bytes)
        self.alert_threshold = alert_threshold

    def handle(self, input_name: str, body: bytes) -> None:
        try:
            message = decode(body)
        except ValueError as exc:
            log.warning("%s: dropped a message that is not JSON: %s", input_name, exc)
            return
        if not isinstance(message, dict) or not isinstance(message.get("deviceId"), str):
            log.warning("%s: dropped a message without a deviceId", input_name)
            return
        if input_name == DEVICE_INPUT:
            self.send(CLASSIFY, encode(message))
        elif input_name == RUL_INPUT:
            rul = message.get("RUL")
            if isinstance(rul, bool) or not isinstance(rul, int | float):
                log.warning("rulInput: dropped a message without a numeric RUL")
                return
            self.send(AVRO, encode(message))
            if self.alert_threshold is None or rul < self.alert_threshold:
                self.send(UPSTREAM, encode({"deviceId": message["deviceId"], "RUL": rul}))
        else:
            log.warning("unknown input %r; message dropped", input_name)


def main() -> int:
    from modelserve_edge.runtime import serve

    def build(transport: Transport):
        threshold = env_float("RUL_ALERT_THRESHOLD", None)
        log.info("upstream: %s", "every RUL" if threshold is None else f"RUL < {threshold}")
        return Router(transport.send, threshold).handle, None

    return serve("router", build)


if __name__ == "__main__":
    sys.exit(main())
