"""Process plumbing shared by the module entry points: logging, signals, start/stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from modelserve_edge.config import ConfigError, setup_logging
from modelserve_edge.transport import Handler, Transport, create_transport

log = logging.getLogger(__name__)


def stop_event() -> threading.Event:
    """An event set by SIGTERM (systemd, docker stop) or SIGINT."""
    event = threading.Event()

    def _stop(signum, frame):
        log.info("signal %s: stopping", signum)
        event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return event


def serve(module: str, build: Callable[[Transport], tuple[Handler, Callable[[], None] | None]]) -> int:
    """Run a receiving module until SIGTERM. ``build(transport)`` returns (handler, cleanup)."""
    setup_logging(module)
    stop = stop_event()
    try:
        transport = create_transport(module)
        handler, cleanup = build(transport)
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        return 2
    try:
        transport.start(handler)
    except ConnectionError as exc:
        log.error("%s", exc)
        return 1
    try:
        stop.wait()
    finally:
        transport.close()
        if cleanup is not None:
            cleanup()
    return 0
