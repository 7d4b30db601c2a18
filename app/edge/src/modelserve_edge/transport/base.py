"""The transport interface every module codes against."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

Handler = Callable[[str, bytes], None]
"""Called with (input name, message body) for every message delivered to the module."""


class Transport(ABC):
    """Send to named outputs, receive on named inputs. Routing between them is not the module's
    business: edgeHub routes (Azure) or the routes file (MQTT) decide where an output goes."""

    module: str

    @abstractmethod
    def start(self, handler: Handler | None = None) -> None:
        """Connect; deliver incoming messages to ``handler`` (None: send-only, e.g. a leaf device)."""

    @abstractmethod
    def send(self, output: str, body: bytes) -> None:
        """Send ``body`` on ``output`` (at least once; may buffer while disconnected)."""

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until sent messages are acknowledged; False on timeout."""
        return True

    @abstractmethod
    def close(self) -> None: ...

    def send_json(self, output: str, obj: Any) -> None:
        self.send(output, encode(obj))


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def decode(body: bytes | str) -> Any:
    return json.loads(body)


def decode_object(body: bytes | str) -> dict:
    """A message that must be one JSON object; ValueError otherwise (malformed or another type)."""
    message = decode(body)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def handle_object(input_name, expected, body, process, log, dropped="a message"):
    """The single-input modules' handler shape: a message on another input, one that is not a JSON
    object, or one ``process`` refuses with ValueError is logged and dropped (None); otherwise
    ``process(message)``'s result."""
    if input_name != expected:
        log.warning("unknown input %r; message dropped", input_name)
        return None
    try:
        return process(decode_object(body))
    except ValueError as exc:
        log.warning("dropped %s: %s", dropped, exc)
        return None
